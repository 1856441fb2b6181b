"""Using a trained model: ``dmf evaluate``, ``dmf recommend``, ``dmf predict``, ``dmf similar``.

Thin layers over the Python API (:mod:`dmf.model.evaluate`, :mod:`dmf.model.recommend`, :class:`dmf.Model`).
``evaluate`` and recommending for every user run on a Dask cluster (``--address``,
``--scheduler-file``, or an embedded LocalCluster); the others run in this process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dmf.cli.common import add_cluster_args, cluster_kwargs
from dmf.errors import InputError, ModelError

PARQUET_SUFFIXES = (".parquet", ".pq")


def register(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="RMSE, MAE and ranking metrics of a model on a held-out split",
        description="RMSE and MAE on the held-out split, and precision, recall, NDCG and MAP at "
        "k (relevant: a held-out rating >= threshold; candidates exclude train items).",
    )
    p.add_argument("model", help="model directory")
    p.add_argument("--store", help="store directory (default: the one recorded in the model)")
    # Defaults (None) come from the `evaluate` section of the model's training config.
    p.add_argument("--split", choices=["test", "validation"], help="default: test")
    p.add_argument("--k", type=int, help="length of the top-k lists (default 10)")
    p.add_argument("--threshold", type=float, help="relevance threshold (default 4.0)")
    p.add_argument("--cold-start", choices=["fallback", "drop"], help="default: fallback")
    p.add_argument("--no-ranking", action="store_true", help="RMSE and MAE only")
    p.add_argument("--json", metavar="OUT", help="also write the metrics to this JSON file")
    add_cluster_args(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "recommend",
        help="top-N items per user (all users, some, or a new user's ratings)",
        description="Top-N unseen items per user, as Parquet (user, rank, item, score). With "
        "--users, only those users (without --address/--scheduler-file this runs in-process); "
        "with --ratings, a new user folded in from a CSV/Parquet file of item,rating.",
    )
    p.add_argument("model", help="model directory")
    p.add_argument("-n", type=int, default=10, help="recommendations per user (default 10)")
    p.add_argument("--users", help="comma-separated raw user ids, or a file of them")
    p.add_argument(
        "--ratings", help="CSV/Parquet file with columns item,rating: fold in a new user"
    )
    p.add_argument("--out", help="output: a .parquet file, or a directory of parts")
    p.add_argument("--store", help="store whose train items are excluded (default: the model's)")
    p.add_argument("--no-exclude", action="store_true", help="do not exclude train items")
    p.add_argument("--cold-start", choices=["fallback", "drop"], default="fallback")
    p.add_argument("--tile-users", type=int, help="users scored at once per task")
    add_cluster_args(p)
    p.set_defaults(func=cmd_recommend)

    p = sub.add_parser(
        "predict",
        help="predicted ratings of (user, item) pairs from a CSV or Parquet file",
    )
    p.add_argument("model", help="model directory")
    p.add_argument("--pairs", required=True, help="CSV or Parquet file with columns user,item")
    p.add_argument("--out", help="output CSV or Parquet (by suffix); default: CSV on stdout")
    p.add_argument("--cold-start", choices=["fallback", "drop"], default="fallback")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("similar", help="top-N most similar items (cosine of item factors)")
    p.add_argument("model", help="model directory")
    p.add_argument("--items", required=True, help="comma-separated raw item ids, or a file")
    p.add_argument("-n", type=int, default=10, help="similar items per item (default 10)")
    p.add_argument("--out", help="output CSV or Parquet (by suffix); default: CSV on stdout")
    p.set_defaults(func=cmd_similar)


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------
def cmd_evaluate(args: argparse.Namespace) -> int:
    from dmf.config import EvaluateConfig
    from dmf.model.evaluate import evaluate, format_table
    from dmf.model.model import load

    model = load(args.model)
    try:
        ev = EvaluateConfig.model_validate(model.config.get("evaluate", {}))
    except Exception:  # noqa: BLE001 - an old or foreign config: use the defaults
        ev = EvaluateConfig()
    store = _store_arg(args.store, model, "evaluate")
    with _connect(model, args) as client:
        result = evaluate(
            model,
            store,
            split=args.split or ev.split,
            k=args.k if args.k is not None else ev.k,
            threshold=args.threshold if args.threshold is not None else ev.threshold,
            cold_start=args.cold_start or ev.cold_start,
            client=client,
            ranking=ev.ranking and not args.no_ranking,
        )
    result["model"] = str(args.model)
    result["store"] = str(store.path)
    print(format_table(result))
    if args.json:
        _write_atomic(Path(args.json), json.dumps(result, indent=1).encode())
    return 0


def cmd_recommend(args: argparse.Namespace) -> int:
    from dmf.model.model import load
    from dmf.model.recommend import recommend_all

    model = load(args.model)
    if args.n < 1:
        raise InputError(f"-n must be at least 1, not {args.n}")
    if args.ratings:
        if args.users:
            raise InputError("give --users or --ratings, not both")
        t = read_columns(args.ratings, ["item", "rating"], {"item": model.item_ids.type})
        recs = model.recommend_for_ratings(
            t.column("item"), t.column("rating").to_numpy(), n=args.n
        )
        _write_table(recs, args.out)
        return 0
    users = parse_ids(args.users, "user") if args.users else None
    if users is None and not args.out:
        raise InputError("recommending for every user needs --out FILE.parquet (or a directory)")
    store = None if args.no_exclude else _store_arg(args.store, model, "recommend")
    use_cluster = users is None or args.address or args.scheduler_file
    with _connect(model, args) if use_cluster else _no_cluster() as client:
        # Everyone: the tasks write the parts and they are combined on disk. Some users: the
        # table is small, kept in input order, and written here (CSV or Parquet).
        out = Path(args.out) if users is None else None
        result = recommend_all(
            model,
            store,
            args.n,
            users=users,
            client=client,
            out=out,
            tile_users=args.tile_users,
            cold_start=args.cold_start,
        )
    if isinstance(result, Path):
        print(f"dmf recommend: wrote {result}", file=sys.stderr)
    else:
        _write_table(result, args.out)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from dmf.model.model import load

    model = load(args.model)
    types = {"user": model.user_ids.type, "item": model.item_ids.type}
    total = cold = cold_u = cold_i = 0
    batches = iter_columns(args.pairs, ["user", "item"], types)

    def scored() -> Iterator[pa.Table]:
        nonlocal total, cold, cold_u, cold_i
        for t in batches:
            p = model.predict(
                t.column("user"), t.column("item"), cold_start=args.cold_start, return_info=True
            )
            total += len(p.known)
            cold += p.cold_pairs
            cold_u += p.cold_users
            cold_i += p.cold_items
            if args.cold_start == "drop":
                t = t.filter(pa.array(p.known))
            yield pa.table(
                {
                    "user": t.column("user"),
                    "item": t.column("item"),
                    "score": pa.array(p.scores.astype(np.float32)),
                }
            )

    _write_stream(scored(), args.out)
    what = "dropped" if args.cold_start == "drop" else "predicted from biases"
    print(
        f"dmf predict: {total} pairs, {cold} cold-start ({cold_u} unknown users, "
        f"{cold_i} unknown items) {what}",
        file=sys.stderr,
    )
    return 0


def cmd_similar(args: argparse.Namespace) -> int:
    from dmf.model.model import load

    model = load(args.model)
    if args.n < 1:
        raise InputError(f"-n must be at least 1, not {args.n}")
    _write_table(model.similar_items(parse_ids(args.items, "item"), n=args.n), args.out)
    return 0


# ---------------------------------------------------------------------------------------------
# Helpers: ids, tables in and out, cluster
# ---------------------------------------------------------------------------------------------
def parse_ids(text: str, what: str) -> pa.Array:
    """Raw ids from ``a,b,c`` or from a file: Parquet/CSV with a ``user``/``item`` column (else
    its first column), or plain text with one id per line (an optional header line)."""
    p = Path(text)
    if p.is_file():
        if p.suffix in PARQUET_SUFFIXES or p.suffix == ".csv":
            t = read_table_file(p)
            col = what if what in t.column_names else t.column_names[0]
            return t.column(col).combine_chunks()
        lines = [s.strip() for s in p.read_text().splitlines()]
        lines = [s for s in lines if s]
        if lines and lines[0] == what:
            lines = lines[1:]
        return pa.array(lines, type=pa.string())
    ids = [s.strip() for s in text.split(",") if s.strip()]
    if not ids:
        raise InputError(f"--{what}s {text!r}: no ids (give a,b,c or a file)")
    return pa.array(ids, type=pa.string())


def read_table_file(path: str | Path, column_types: dict[str, pa.DataType] | None = None):
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} does not exist")
    try:
        if path.suffix in PARQUET_SUFFIXES:
            return pq.read_table(path)
        import pyarrow.csv as pcsv

        return pcsv.read_csv(path, **_csv_options(path, column_types))
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from exc


def _csv_options(path: Path, column_types) -> dict[str, Any]:
    import pyarrow.csv as pcsv

    delim = "\t" if path.suffix in (".tsv", ".tab") else ","
    return {
        "parse_options": pcsv.ParseOptions(delimiter=delim),
        "convert_options": pcsv.ConvertOptions(column_types=column_types or {}),
    }


def _check_columns(path, names: list[str], columns: list[str]) -> None:
    missing = [c for c in columns if c not in names]
    if missing:
        raise InputError(
            f"{path}: no column {missing[0]!r} (columns are {names}); "
            f"the file needs a header with {', '.join(columns)}"
        )


def read_columns(path: str | Path, columns: list[str], types: dict[str, pa.DataType]) -> pa.Table:
    t = read_table_file(path, types)
    _check_columns(path, t.column_names, columns)
    return t.select(columns)


def iter_columns(
    path: str | Path, columns: list[str], types: dict[str, pa.DataType], batch_rows: int = 1 << 20
) -> Iterator[pa.Table]:
    """Stream ``columns`` of a CSV or Parquet file in batches (bounded memory)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} does not exist")
    try:
        if path.suffix in PARQUET_SUFFIXES:
            pf = pq.ParquetFile(path)
            _check_columns(path, pf.schema_arrow.names, columns)
            for b in pf.iter_batches(batch_size=batch_rows, columns=columns):
                yield pa.Table.from_batches([b])
            return
        import pyarrow.csv as pcsv

        opts = _csv_options(path, types)
        reader = pcsv.open_csv(
            path,
            read_options=pcsv.ReadOptions(block_size=1 << 24),
            **opts,
        )
        _check_columns(path, reader.schema.names, columns)
        for b in reader:
            yield pa.Table.from_batches([b]).select(columns)
    except pa.ArrowInvalid as exc:
        raise InputError(f"cannot read {path}: {exc}") from exc


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _write_table(table: pa.Table, out: str | None) -> None:
    _write_stream(iter([table]), out, table.schema)


def _write_stream(tables: Iterator[pa.Table], out: str | None, schema=None) -> None:
    """Write tables as CSV to stdout, or to ``out`` (Parquet or CSV by suffix) atomically."""
    import pyarrow.csv as pcsv

    if out is None:
        first = True
        for t in tables:
            pcsv.write_csv(t, sys.stdout.buffer, pcsv.WriteOptions(include_header=first))
            first = False
        sys.stdout.flush()
        return
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    writer = None
    try:
        for t in tables:
            if writer is None:
                if path.suffix in PARQUET_SUFFIXES:
                    writer = pq.ParquetWriter(tmp, t.schema, compression="zstd")
                else:
                    writer = pcsv.CSVWriter(tmp, t.schema)
            writer.write_table(t)
        if writer is None:
            if schema is None:
                raise InputError("no rows to write")
            writer = (
                pq.ParquetWriter(tmp, schema)
                if path.suffix in PARQUET_SUFFIXES
                else pcsv.CSVWriter(tmp, schema)
            )
        writer.close()
        writer = None
        os.replace(tmp, path)
    finally:
        if writer is not None:
            writer.close()
        if tmp.exists():
            tmp.unlink()
    print(f"dmf: wrote {path}", file=sys.stderr)


def _store_arg(store: str | None, model, command: str):
    from dmf.store.layout import Store

    path = store or model.store_path
    if not path:
        raise ModelError(f"dmf {command}: the model records no store path; give --store STORE")
    return Store.open(path)


class _no_cluster:
    def __enter__(self):
        return None

    def __exit__(self, *exc) -> None:
        return None


def _connect(model, args: argparse.Namespace):
    """The cluster: --address/--scheduler-file, else a LocalCluster like the model's training."""
    from dmf.config import ClusterConfig
    from dmf.dist.cluster import connect

    try:
        cc = ClusterConfig.model_validate(model.config.get("cluster", {}))
    except Exception:  # noqa: BLE001 - an old or foreign config: use the defaults
        cc = ClusterConfig()
    if cc.kind != "local":
        # The address a model was trained on is rarely still alive: start a local cluster
        # unless told otherwise on the command line.
        cc = ClusterConfig()
    return connect(cc, **cluster_kwargs(args))
