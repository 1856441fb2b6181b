"""Using a trained model: ``dmf evaluate``, ``dmf recommend``, ``dmf predict``, ``dmf similar``.

Thin layers over the Python API (:mod:`dmf.model.evaluate`, :mod:`dmf.model.recommend`,
:class:`dmf.Model`); reading and writing tables is :mod:`dmf.cli.tables`.
``evaluate`` and recommending for every user run on a Dask cluster (``--address``,
``--scheduler-file``, or an embedded LocalCluster); the others run in this process.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from dmf.cli.common import add_cluster_args, cluster_kwargs
from dmf.cli.tables import (
    iter_columns,
    parse_ids,
    read_columns,
    write_json,
    write_stream,
    write_table,
)
from dmf.errors import InputError, ModelError
from dmf.store.storage import Location


def register(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="RMSE, MAE and ranking metrics of a model on a held-out split",
        description="RMSE and MAE on the held-out split, and precision, recall, NDCG, MAP and "
        "hit rate at k (relevant: a held-out rating >= threshold; candidates exclude train "
        "items). An implicit-feedback model: ranking metrics only, every held-out event "
        "relevant. With --negatives N, each user's candidates are its relevant held-out items "
        "and N sampled items, reported under their own labels.",
    )
    p.add_argument("model", help="model directory")
    p.add_argument("--store", help="store directory (default: the one recorded in the model)")
    # Defaults (None) come from the `evaluate` section of the model's training config.
    p.add_argument(
        "--split",
        choices=["test", "validation"],
        help="held-out split to evaluate (default: evaluate.split of the model's config)",
    )
    p.add_argument(
        "--k",
        type=int,
        help="length of the top-k lists (default: evaluate.k of the model's config)",
    )
    p.add_argument(
        "--threshold",
        type=float,
        help="a held-out rating at or above this is relevant (default: evaluate.threshold of the "
        "model's config); not used for an implicit-feedback model, where every held-out event "
        "is relevant",
    )
    p.add_argument(
        "--cold-start",
        choices=["fallback", "drop"],
        help="unknown users or items: predicted from the known biases (fallback) or skipped "
        "(drop); default: evaluate.cold_start of the model's config",
    )
    p.add_argument(
        "--negatives",
        type=int,
        metavar="N",
        help="sampled-negative evaluation: rank each user's relevant held-out items among N items "
        "drawn at random (seeded) from those it has no train or held-out event with, instead of "
        "every item; reported as e.g. 'precision@10 (N sampled negatives)', not comparable with "
        "full-catalogue figures. 0: every item (default: evaluate.negatives of the model's config)",
    )
    p.add_argument("--no-ranking", action="store_true", help="RMSE and MAE only")
    add_no_clip_arg(p)
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
    p.add_argument(
        "--cold-start",
        choices=["fallback", "drop"],
        default="fallback",
        help="users the model does not know: items ranked by their bias (fallback, the "
        "default) or no recommendations (drop)",
    )
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
    p.add_argument(
        "--cold-start",
        choices=["fallback", "drop"],
        default="fallback",
        help="pairs with an unknown user or item: predicted from the known biases (fallback, "
        "the default) or left out of the output (drop)",
    )
    add_no_clip_arg(p)
    add_cluster_args(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("similar", help="top-N most similar items (cosine of item factors)")
    p.add_argument("model", help="model directory")
    p.add_argument("--items", required=True, help="comma-separated raw item ids, or a file")
    p.add_argument("-n", type=int, default=10, help="similar items per item (default 10)")
    p.add_argument("--out", help="output CSV or Parquet (by suffix); default: CSV on stdout")
    p.set_defaults(func=cmd_similar)


def add_no_clip_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-clip",
        action="store_true",
        help="raw predictions mu + b_i + c_j + u_i . v_j, not clipped to the rating range the "
        "model was trained on (model.clip)",
    )


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------
def cmd_evaluate(args: argparse.Namespace) -> int:
    from dmf.config import EvaluateConfig
    from dmf.model.evaluate import evaluate, format_table
    from dmf.model.model import load

    model = load(args.model)
    if args.no_clip:
        model.clip = False
    try:
        ev = EvaluateConfig.model_validate(model.config.get("evaluate", {}))
    except Exception:  # noqa: BLE001 - an old or foreign config: use the defaults
        ev = EvaluateConfig()
    if args.negatives is not None and args.negatives < 0:
        raise InputError(f"--negatives must be at least 0, not {args.negatives}")
    negatives = ev.negatives if args.negatives is None else (args.negatives or None)
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
            negatives=negatives,
        )
    result["model"] = str(Location.of(args.model))
    result["store"] = str(store.root)
    print(format_table(result))
    if args.json:
        write_json(args.json, result)
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
        t = read_columns(
            args.ratings, ["item", "rating"], {"item": model.item_ids.type}, _options(model)
        )
        recs = model.recommend_for_ratings(
            t.column("item"), t.column("rating").to_numpy(), n=args.n
        )
        write_table(recs, args.out, _options(model))
        return 0
    users = parse_ids(args.users, "user", _options(model)) if args.users else None
    if users is None and not args.out:
        raise InputError("recommending for every user needs --out FILE.parquet (or a directory)")
    store = None if args.no_exclude else _store_arg(args.store, model, "recommend")
    use_cluster = users is None or args.address or args.scheduler_file
    with _connect(model, args) if use_cluster else _no_cluster() as client:
        # Everyone: the tasks write the parts and they are combined on disk. Some users: the
        # table is small, kept in input order, and written here (CSV or Parquet). A relative
        # --out is made absolute here, on the driver, before it reaches a worker.
        out = Location.of(args.out, _options(model)) if users is None else None
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
    if isinstance(result, Location):
        print(f"dmf recommend: wrote {result}", file=sys.stderr)
    else:
        write_table(result, args.out, _options(model))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from dmf.model.model import load
    from dmf.model.predict import predict_batches

    model = load(args.model)
    if args.no_clip:
        model.clip = False
    types = {"user": model.users.id_type, "item": model.items.id_type}
    total = cold = cold_u = cold_i = 0
    batches = iter_columns(args.pairs, ["user", "item"], types, options=_options(model))
    # A model whose users are on disk scores block by block on the cluster.
    use_cluster = not model.users.in_memory or args.address or args.scheduler_file

    def scored(client) -> Iterator[pa.Table]:
        nonlocal total, cold, cold_u, cold_i
        for t, p in predict_batches(model, batches, args.cold_start, client):
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

    with _connect(model, args) if use_cluster else _no_cluster() as client:
        write_stream(scored(client), args.out, options=_options(model))
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
    items = parse_ids(args.items, "item", _options(model))
    write_table(model.similar_items(items, n=args.n), args.out, _options(model))
    return 0


# ---------------------------------------------------------------------------------------------
# Helpers: the store and the cluster of a model
# ---------------------------------------------------------------------------------------------
def _options(model) -> dict:
    """The storage options the model was trained with (``storage.options``); the standard
    environment supplies the rest."""
    return model.storage_options()


def _store_arg(store: str | None, model, command: str):
    from dmf.store.layout import Store

    path = store or model.store_path
    if not path:
        raise ModelError(f"dmf {command}: the model records no store path; give --store STORE")
    return Store.open(path, options=_options(model))


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
