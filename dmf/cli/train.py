"""``dmf train`` and ``dmf run`` (the whole job: synthesize or ingest if needed, train, evaluate)."""

from __future__ import annotations

import argparse
import sys

from dmf.cli.common import add_cluster_args, add_config_arg, cluster_kwargs, config_from_args
from dmf.cli.tables import write_json
from dmf.store.storage import config_location


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model on a store", description="Store -> model.")
    add_config_arg(p)
    add_cluster_args(p)
    add_start_args(p)
    p.add_argument("--store", help="store directory (default: store.path of the config)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress or per-iteration lines")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "run",
        help="the whole job: synthesize/ingest if needed, train, evaluate",
        description="Ingest if the store is missing, train, then evaluate on the test split.",
    )
    add_config_arg(p)
    add_cluster_args(p)
    add_start_args(p)
    p.add_argument(
        "-q", "--quiet", action="store_true", help="no progress bars or per-iteration lines"
    )
    p.set_defaults(func=cmd_run)


def add_start_args(p: argparse.ArgumentParser) -> None:
    """--resume or --fresh: what to do with the checkpoints of an earlier run in the model
    directory (with neither, training refuses to start when there are some)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint (if any)"
    )
    g.add_argument(
        "--fresh",
        action="store_true",
        help="discard the checkpoints of an earlier run in the model directory and start over",
    )


def cmd_train(args: argparse.Namespace) -> int:
    from dmf.store.layout import Store
    from dmf.train.loop import train

    cfg = config_from_args(args)
    store = Store.open(config_location(cfg, args.store or cfg.store.path))
    # The model is written; this process has no use for its factors (in_memory=False reads
    # only model.json).
    train(
        store,
        cfg,
        resume=args.resume,
        fresh=args.fresh,
        quiet=args.quiet,
        in_memory=False,
        **cluster_kwargs(args),
    )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from dmf.dist.cluster import connect
    from dmf.train.loop import train

    cfg = config_from_args(args)
    with connect(cfg, quiet=args.quiet, **cluster_kwargs(args)) as client:
        store = store_for_job(cfg, client, args)
        model = train(
            store, cfg, client=client, resume=args.resume, fresh=args.fresh, quiet=args.quiet
        )
        if store.n_split(cfg.evaluate.split) == 0:
            print(
                f"dmf run: the store has no {cfg.evaluate.split} split; skipping evaluation",
                file=sys.stderr,
            )
            return 0
        from dmf.model.evaluate import evaluate, format_table

        e = cfg.evaluate
        metrics = evaluate(
            model,
            store,
            split=e.split,
            k=e.k,
            threshold=e.threshold,
            cold_start=e.cold_start,
            ranking=e.ranking,
            negatives=e.negatives,
            client=client,
        )
    out = config_location(cfg, cfg.output.model) / "evaluation.json"
    write_json(out, metrics)
    print(format_table(metrics))
    print(f"dmf run: metrics written to {out}", file=sys.stderr)
    return 0


def store_for_job(cfg, client, args: argparse.Namespace):
    """The store of a job run on ``client`` by a command with the cluster options
    (:func:`prepare_store`: made first when it is missing), as ``dmf run`` and ``dmf tune``
    open it."""
    # A LocalCluster shares this machine's disk and cores: ingest on threads, which skips
    # moving spill data between processes (1.2-1.5x faster here; the store is identical).
    local = cfg.cluster.kind == "local" and not (args.address or args.scheduler_file)
    return prepare_store(cfg, None if local else client, quiet=args.quiet)


def prepare_store(cfg, client, quiet: bool = False):
    """Open the configured store, making it first when it is missing (synth, then ingest)."""
    from dmf.errors import StoreError
    from dmf.store.layout import Store

    if cfg.synth.enabled and not synth_is_current(cfg):
        from dmf.data.synth import synth

        # New planted data: the inputs' fingerprint changes, so the store is rebuilt below.
        synth(
            cfg.synth,
            config_location(cfg, cfg.synth.path),
            overwrite=True,
            progress=None if not quiet else False,
        )
    path = config_location(cfg, cfg.store.path)
    try:
        store = Store.open(path)
    except StoreError:
        store = None
    if store is not None:
        if store_is_current(store, cfg):
            if not quiet:
                print(
                    f"dmf: using the store at {path} ({store.n_train:,} train ratings)",
                    file=sys.stderr,
                )
            return store
        if not cfg.store.overwrite:
            raise StoreError(
                f"the store at {path} was made from other inputs or settings than this config; "
                "set store.overwrite: true to rebuild it, or point store.path elsewhere"
            )
    from dmf.data.ingest import ingest

    return ingest(cfg, client=client)


def synth_is_current(cfg) -> bool:
    """Whether the synthetic ratings at synth.path were made with this config's synth settings."""
    from dmf.errors import DmfError
    from dmf.store.storage import read_manifest

    doc = read_manifest(config_location(cfg, cfg.synth.path), "synth.json", error=DmfError)
    if doc is None:
        return False
    made = dict(doc.get("config", {}))
    want = cfg.to_dict()["synth"]
    # Ratings written before synth.implicit existed are ratings: implicit false.
    made.setdefault("implicit", False)
    skip = {"enabled", "path"}
    return {k: v for k, v in made.items() if k not in skip} == {
        k: v for k, v in want.items() if k not in skip
    }


def store_is_current(store, cfg) -> bool:
    """Whether ``store`` was ingested from this config's inputs and settings (its fingerprint).

    A store whose raw inputs are no longer there is taken as it is: that is how a store is
    used after the raw files were cleaned up."""
    from dmf.data.ingest import data_to_ingest, fingerprint, resolve_inputs
    from dmf.errors import DmfError

    if cfg.data.source is None and not cfg.synth.enabled:
        return True
    try:
        spec = resolve_inputs(data_to_ingest(cfg), cfg.resolve, cfg.storage.options)
        made_from = fingerprint(cfg, spec)  # an object gone from a URL raises here
    except DmfError:
        if cfg.synth.enabled:
            return False  # synth output missing: make it, then ingest
        print(
            f"dmf: raw inputs not found; using the existing store at {store.root}", file=sys.stderr
        )
        return True
    return made_from == store.fingerprint
