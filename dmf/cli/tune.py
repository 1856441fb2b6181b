"""``dmf tune``: search rank, regularisation, ALS-WR and iterations on the validation split
(:mod:`dmf.tune`), and write the best config for ``dmf run``."""

from __future__ import annotations

import argparse
import logging

from dmf.cli.common import add_cluster_args, add_config_arg, cluster_kwargs, config_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tune",
        help="search rank, reg, reg_bias, ALS-WR and iterations on the validation split",
        description="Hyperparameter search (Optuna: TPE sampler, median or Hyperband pruning) "
        "over the config's `tune` section: trials train in parallel on the Dask cluster and "
        "are scored by their best validation RMSE. Makes the store first if it is missing "
        "(as `dmf run` does). Writes trials.csv, trials.png, tune.json and best.yaml to "
        "tune.output; `dmf run best.yaml` trains the best model again.",
    )
    add_config_arg(p)
    add_cluster_args(p)
    p.add_argument(
        "--trials", type=int, metavar="N", help="number of trials (default: tune.trials)"
    )
    p.add_argument(
        "--parallel",
        type=int,
        metavar="N",
        help="trials trained at once on the cluster (default: tune.parallel)",
    )
    p.add_argument(
        "--output", metavar="DIR", help="directory of the results (default: tune.output)"
    )
    p.add_argument(
        "-q", "--quiet", action="store_true", help="no line per trial; the table is still printed"
    )
    p.set_defaults(func=cmd_tune)


def cmd_tune(args: argparse.Namespace) -> int:
    import optuna

    from dmf.cli.train import store_for_job
    from dmf.dist.cluster import connect
    from dmf.tune import Metric, format_table, tune

    for key, value in (("trials", args.trials), ("parallel", args.parallel)):
        if value is not None:
            args.set.append(f"tune.{key}={value}")
    if args.output is not None:
        args.set.append(f"tune.output={args.output}")
    cfg = config_from_args(args)
    if not args.verbose:
        # dmf prints a line per trial: Optuna's own, and each trial's plan of the half-steps
        # (dmf's INFO log), would repeat it.
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        logging.getLogger("dmf").setLevel(logging.WARNING)
    with connect(cfg, quiet=args.quiet, **cluster_kwargs(args)) as client:
        store = store_for_job(cfg, client, args)
        result = tune(cfg, store, client=client, quiet=args.quiet)
    print(format_table(result.trials, Metric.of(cfg)))
    return 0
