"""``dmf synth`` (planted-truth ratings) and ``dmf data movielens`` (download a release)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dmf.cli.common import add_set_arg
from dmf.config import load_config

# --flag -> synth config key; a flag left out keeps the config's (or the default) value.
_SYNTH_FLAGS = {
    "users": "n_users",
    "items": "n_items",
    "ratings": "n_ratings",
    "rank": "rank",
    "noise": "noise",
    "user_skew": "user_skew",
    "item_skew": "item_skew",
    "mu": "mu",
    "round_to": "round_to",
    "clip": "clip",
    "seed": "seed",
    "files": "files",
    "format": "format",
    "implicit": "implicit",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="write planted-truth ratings of any size (for tests and scale runs)",
        description=(
            "Write ratings r = mu + b_u + c_i + u.v + noise with known factors, streamed in "
            "bounded memory: DIR/ratings/part-NNNNN.parquet|csv, DIR/truth.npz, DIR/synth.json. "
            "With --implicit, events of implicit feedback instead: each user's events fall on "
            "items drawn in proportion to popularity x exp(beta u.v), with a count each (the "
            "rating column), favourite items repeated over several rows. "
            "Settings come from CONFIG.yaml's synth section (if given), then --set, then flags."
        ),
    )
    p.add_argument("config", nargs="?", help="YAML config; its synth section is used")
    add_set_arg(p)
    p.add_argument("--out", help="output directory (default: synth.path of the config)")
    p.add_argument("--users", type=int, help="number of users")
    p.add_argument("--items", type=int, help="number of items")
    p.add_argument(
        "--ratings",
        type=int,
        help="number of distinct (user, item) ratings (--implicit: of event rows)",
    )
    p.add_argument("--rank", type=int, help="rank of the true factors")
    p.add_argument("--noise", type=float, help="standard deviation of the rating noise")
    p.add_argument("--user-skew", type=float, help="Zipf exponent of user activity (0: uniform)")
    p.add_argument("--item-skew", type=float, help="Zipf exponent of item popularity (0: uniform)")
    p.add_argument("--mu", type=float, help="global mean before clipping")
    p.add_argument("--round-to", type=float, help="round ratings to a multiple of this")
    p.add_argument("--clip", type=float, nargs=2, metavar=("LO", "HI"), help="rating range")
    p.add_argument(
        "--seed", type=int, help="seed of every random draw: the same seed, the same ratings"
    )
    p.add_argument("--files", type=int, help="number of output files")
    p.add_argument("--format", choices=["parquet", "csv"], help="file format of the ratings")
    p.add_argument(
        "--implicit",
        action="store_true",
        default=None,
        help="planted-preference events with counts (implicit feedback) instead of ratings "
        "(synth.implicit)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty DIR")
    p.add_argument("--chunk", type=int, default=None, help="ratings per generated chunk")
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--progress",
        dest="progress",
        action="store_true",
        default=None,
        help="show a progress bar (default: only on a terminal)",
    )
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=_synth)

    d = sub.add_parser("data", help="download public rating datasets")
    dsub = d.add_subparsers(
        dest="dataset", metavar="DATASET", required=True, help="the dataset to download"
    )
    from dmf.data.movielens import BASE_URL, RELEASES

    m = dsub.add_parser(
        "movielens",
        help="download a MovieLens release from GroupLens, verified, where the presets read it",
        description=(
            "Download ml-VARIANT.zip, verify its MD5 against the published .md5 file (and the "
            "checksum pinned in dmf for the official archives), and unpack it into DIR, e.g. "
            "data/ml-1m/ratings.dat for data.preset movielens-1m."
        ),
    )
    m.add_argument("variant", choices=list(RELEASES), help="release")
    m.add_argument("--dir", default="data", help="where to unpack (default: data)")
    m.add_argument("--base-url", default=BASE_URL, help=f"mirror (default: {BASE_URL})")
    m.add_argument("--md5", help="expected MD5 of the archive, if not published or pinned")
    m.add_argument("--force", action="store_true", help="download again even if present")
    g = m.add_mutually_exclusive_group()
    g.add_argument(
        "--progress",
        dest="progress",
        action="store_true",
        default=None,
        help="show a download progress bar (default: only on a terminal)",
    )
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    m.set_defaults(func=_movielens)


def _synth(args: argparse.Namespace) -> int:
    from dmf.data.synth import DEFAULT_CHUNK_RATINGS, synth
    from dmf.store.storage import Location, config_location

    flags: dict[str, Any] = {}
    for flag, key in _SYNTH_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            flags[key] = list(value) if isinstance(value, list) else value
    cfg = load_config(args.config, args.set, raw={"synth": flags} if flags else None)
    # --out is relative to the current directory; synth.path to the config file.
    out = (
        Location.of(args.out, cfg.storage.options)
        if args.out
        else config_location(cfg, cfg.synth.path)
    )
    summary = synth(
        cfg.synth,
        out,
        overwrite=args.overwrite,
        progress=args.progress,
        chunk_ratings=args.chunk or DEFAULT_CHUNK_RATINGS,
    )
    what = (
        f"events ({summary['distinct_pairs']:,} distinct (user, item) pairs, "
        f"{summary['repeated_rows']:,} repeated rows; "
        if cfg.synth.implicit
        else "ratings ("
    )
    print(
        f"wrote {summary['n_ratings']:,} {what}{summary['users_with_ratings']:,} users x "
        f"{summary['items_with_ratings']:,} items rated) to {out}/ratings in "
        f"{summary['seconds']:.1f} s; truth in {out / summary['files']['truth.npz']['path']}, "
        f"summary in {out}/synth.json"
    )
    return 0


def _movielens(args: argparse.Namespace) -> int:
    from dmf.data.movielens import RELEASES, download

    path = download(
        args.variant,
        Path(args.dir),
        base_url=args.base_url,
        progress=args.progress,
        md5=args.md5,
        force=args.force,
    )
    rel = RELEASES[args.variant]
    print(
        f"MovieLens {args.variant} is in {path} (ratings: {path / rel.ratings}); "
        f"ingest it with data.preset: movielens-{args.variant} and data.source: {path}"
    )
    return 0
