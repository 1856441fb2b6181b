"""The ``dmf`` command line: one entry point, one sub-command per operation.

Each area registers its sub-commands from its own module (``dmf/cli/<area>.py``, a ``register``
function); every command is a thin layer over the Python API. Errors of our own
(:class:`dmf.errors.DmfError`) are printed as one message without a traceback, exit status 2.

The top layer: it may import every other. Sub-command modules import what they run inside the
command's function, so that ``dmf --help`` does not load Dask, NumPy or the solver.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from dmf.errors import DmfError

AREAS = ["store", "datasets", "train", "use", "config", "tune"]


def build_parser() -> argparse.ArgumentParser:
    from dmf import __version__

    parser = argparse.ArgumentParser(
        prog="dmf",
        description="Distributed matrix factorization (biased ALS) on Dask.",
    )
    parser.add_argument("--version", action="version", version=f"dmf {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for area in AREAS:
        try:
            mod = importlib.import_module(f"dmf.cli.{area}")
        except ModuleNotFoundError as exc:
            if exc.name == f"dmf.cli.{area}":
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.verbose:
        # Before distributed is imported, so that it and the worker processes it starts (which
        # inherit the environment) log warnings only; the dashboard link is printed by dmf.
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    # dmf's own messages at INFO; Dask's chatter (worker start/stop) only with --verbose.
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("dmf").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if not args.verbose:
        for name in ("distributed", "bokeh", "tornado"):
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        rc = args.func(args)
    except DmfError as exc:
        print(f"dmf {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dmf {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
