"""Options shared by the sub-commands: config, --set overrides, and the cluster to use."""

from __future__ import annotations

import argparse

from dmf.config import Config, load_config


def add_config_arg(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("config", nargs=None if required else "?", help="YAML config file")
    add_set_arg(p)


def add_set_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set model.rank=32 (repeatable)",
    )


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--address", help="use the running Dask scheduler at tcp://HOST:PORT")
    g.add_argument("--scheduler-file", help="use the Dask cluster described by this file")


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(getattr(args, "config", None), getattr(args, "set", None))


def cluster_kwargs(args: argparse.Namespace) -> dict:
    return {
        "address": getattr(args, "address", None),
        "scheduler_file": getattr(args, "scheduler_file", None),
    }
