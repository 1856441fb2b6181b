"""``dmf ingest CONFIG`` (raw ratings -> store); ``dmf info``, ``dmf verify`` and ``dmf clean``
on a store or a model directory (a local path or a URL)."""

from __future__ import annotations

import argparse
import json
import sys

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
        help="summary of a store or a model: counts, blocks, splits, size, leftover files",
        description="Open a store (or a model directory) and print a summary, or its manifest "
        "with --json. Files that an interrupted write left behind are reported; `dmf clean` "
        "removes them.",
    )
    p.add_argument("path", metavar="DIR", help="the directory dmf wrote (path or URL)")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "verify",
        help="check every file of a store, model, recommendation or synth output against its "
        "manifest (size and checksum)",
        description="Read every file a store, model, recommendation or synth directory lists "
        "(and a model's checkpoints with the factor files they name) and check its size and "
        "CRC-32. Exit status 2 names the first bad file.",
    )
    p.add_argument("path", metavar="DIR", help="the directory dmf wrote (path or URL)")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser(
        "clean",
        help="remove the files interrupted writes left in a store, model, recommendation or "
        "synth directory",
        description="Delete dmf's files that no manifest lists in a store, model, "
        "recommendation or synth directory (killed ingests, saves, checkpoints, evaluations). "
        "Files dmf did not write, and directories holding another dmf output's manifest, are "
        "never touched. Use --dry-run to list them first.",
    )
    p.add_argument("path", metavar="DIR", help="the directory dmf wrote (path or URL)")
    p.add_argument("-n", "--dry-run", action="store_true", help="list, do not delete")
    p.set_defaults(func=cmd_clean)


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


# The manifest each kind of dmf output commits last (see dmf.store.storage.Commit).
def _manifests() -> dict[str, str]:
    from dmf.data.synth import MANIFEST as SYNTH_MANIFEST
    from dmf.model.model import MODEL_JSON
    from dmf.model.recommend import RECS_MANIFEST
    from dmf.store.layout import MANIFEST
    from dmf.train.checkpoint import STATE

    return {
        "store": MANIFEST,
        "model": MODEL_JSON,
        "recommendations": RECS_MANIFEST,
        "synth output": SYNTH_MANIFEST,
        "checkpoint": STATE,
    }


def _what(path: str):
    """(kind, location) of a directory dmf wrote: kind is 'store', 'model', 'recommendations'
    or 'synth output' (from the manifest it holds), or None."""
    from dmf.store.storage import Location

    loc = Location.of(path)
    for kind, manifest in _manifests().items():
        if kind != "checkpoint" and (loc / manifest).exists():
            return kind, loc
    return None, loc


def _leftovers(kind: str | None, loc) -> list[str]:
    """What killed writes left in the directory ``loc`` of ``kind``: never a file of another
    dmf output nested inside it (a store under a model directory, say), whose files no
    manifest of ``loc`` lists."""
    from dmf.errors import StoreError
    from dmf.model.model import model_leftovers
    from dmf.store.storage import leftovers, read_manifest
    from dmf.train.checkpoint import checkpoint_leftovers

    names = {m: k for k, m in _manifests().items() if k != "checkpoint"}
    nested = sorted(
        {
            rel.rsplit("/", 1)[0]
            for rel in loc.files()
            if "/" in rel and rel.rsplit("/", 1)[-1] in names
        }
    )
    if kind == "model":
        stray = model_leftovers(loc) + [
            f"checkpoints/{rel}" for rel in checkpoint_leftovers(loc / "checkpoints")
        ]
    elif kind is not None:
        manifest = _manifests()[kind]
        stray = leftovers(loc, manifest, read_manifest(loc, manifest, error=StoreError))
    elif nested:
        # No manifest here: a directory that holds dmf's outputs further down.
        rel = nested[0]
        raise StoreError(
            f"{loc} holds a dmf output in {loc / rel}; dmf clean and info work on one store, "
            "model, recommendation or synth directory at a time: name that directory"
        )
    else:  # a first write killed before committing
        stray = leftovers(loc, "", None)
    return [rel for rel in stray if not any(rel.startswith(d + "/") for d in nested)]


def _not_found(loc, stray: list[str]):
    from dmf.errors import StoreError

    more = (
        f"; it holds {len(stray)} file(s) an interrupted write left behind "
        f"(`dmf clean {loc}` removes them)"
        if stray
        else ""
    )
    return StoreError(
        f"{loc} holds no store (manifest.json), model (model.json), recommendations "
        f"(_manifest.json) or synth output (synth.json){more}"
    )


def cmd_info(args: argparse.Namespace) -> int:
    from dmf.model.model import load
    from dmf.store.layout import Store

    kind, loc = _what(args.path)
    if kind is None:
        raise _not_found(loc, _leftovers(kind, loc))
    if kind == "model":
        model = load(loc)
        if args.json:
            print(json.dumps(model.manifest(), indent=1, default=str))
        else:
            print(format_model_info(model, loc))
    elif kind == "store":
        store = Store.open(loc)
        if args.json:
            print(store.manifest.model_dump_json(indent=1, exclude_none=True))
        else:
            print(format_info(store))
    else:
        from dmf.errors import StoreError
        from dmf.store.storage import entries_of, read_manifest, size_text

        doc = read_manifest(loc, _manifests()[kind], error=StoreError) or {}
        if args.json:
            print(json.dumps(doc, indent=1, default=str))
        else:
            entries = entries_of(doc)
            n_bytes = sum(e.bytes for e in entries.values())
            print(f"{kind} {loc}\nfiles        {len(entries)}, {size_text(n_bytes)}")
    stray = _leftovers(kind, loc)
    if stray and not args.json:
        print(
            f"leftovers    {len(stray)} file(s) of interrupted writes, e.g. {stray[0]}; "
            f"`dmf clean {loc}` removes them"
        )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from dmf.errors import CheckpointError, StoreError
    from dmf.model.model import verify_model
    from dmf.store.layout import Store
    from dmf.store.storage import entries_of, read_manifest, size_text, verify_file
    from dmf.train.checkpoint import list_checkpoints, read_checkpoint
    from dmf.train.state import checkpoint_side_refs

    kind, loc = _what(args.path)
    if kind is None:
        raise _not_found(loc, _leftovers(kind, loc))
    if kind == "store":
        store = Store.open(loc)
        n_bytes, n_files = store.verify_all(), len(store.manifest.files)
    elif kind == "model":
        n_files, n_bytes = verify_model(loc)
        for ckpt in list_checkpoints(loc / "checkpoints"):
            state, _ = read_checkpoint(ckpt)  # every array file checked
            n_files += len(state.get("files", {}))
            n_bytes += sum(e["bytes"] for e in state.get("files", {}).values())
            # ... and the side block files it names, which --resume reads.
            for ref in checkpoint_side_refs(state, loc):
                verify_file(ref.location, ref.entry, CheckpointError)
                n_files += 1
                n_bytes += ref.entry.bytes
    else:
        manifest = _manifests()[kind]
        entries = entries_of(read_manifest(loc, manifest, error=StoreError) or {})
        for rel, entry in entries.items():
            verify_file(loc / (entry.path or rel), entry)
        n_files, n_bytes = len(entries), sum(e.bytes for e in entries.values())
    print(f"dmf verify: {loc}: {n_files} files, {size_text(n_bytes)}, every size and checksum ok")
    return 0


def _live_writer(loc):
    """The holder of the directory's live writer lease (a training run), or None."""
    from dmf.store.lease import WRITER, read_holder

    holder = read_holder(loc / WRITER)
    return None if holder is None or holder.stale() else holder


def cmd_clean(args: argparse.Namespace) -> int:
    from dmf.store.storage import clean

    kind, loc = _what(args.path)
    stray = _leftovers(kind, loc)
    for rel in stray:
        print(rel)
    writer = _live_writer(loc)
    if writer is not None and not args.dry_run:
        # A run writing here has files in flight that no manifest lists yet.
        from dmf.errors import LeaseError

        raise LeaseError(
            f"{loc} is being written by a training run, {writer.describe()}: its files in "
            "flight would look like leftovers; clean it after the run ends"
        )
    if args.dry_run:
        print(f"dmf clean: {len(stray)} file(s) would be removed from {loc}", file=sys.stderr)
    else:
        clean(loc, stray)
        print(f"dmf clean: removed {len(stray)} file(s) from {loc}", file=sys.stderr)
    return 0


def format_model_info(model, loc) -> str:
    """A human summary of a model directory (what ``dmf info MODEL`` prints)."""
    h = model.history
    lines = [
        f"model        {loc}",
        f"rank         {model.rank}",
        f"users        {model.n_users:,}",
        f"items        {model.n_items:,}",
        f"mu           {model.mu:.4f}" + (" (implicit feedback)" if model.implicit else ""),
        f"iterations   {len(h)}"
        + (f" ({model.meta['stopped']})" if "stopped" in model.meta else ""),
    ]
    if h:
        last = h[-1]
        if "validation_ndcg" in last:
            val = last["validation_ndcg"]
            lines.append(
                f"last         weighted loss {last['train_loss']:.6g}"
                + (f", validation NDCG {val:.4f}" if val is not None else "")
            )
        else:
            val = last.get("validation_rmse")
            lines.append(
                f"last         train RMSE {last['train_rmse']:.4f}"
                + (f", validation RMSE {val:.4f}" if val is not None else "")
            )
    if "best_iteration" in model.meta:
        lines.append(f"best         iteration {model.meta['best_iteration']}")
    lines.append(f"store        {model.store_path or '-'} ({model.store_fingerprint or '-'})")
    return "\n".join(lines)


def format_info(store) -> str:
    """A human summary of a store (what ``dmf info`` prints)."""
    from dmf.store.storage import size_text

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
    lines.append(f"disk         {size_text(store.disk_bytes())} in {len(m.files)} files")
    lines.append(f"fingerprint  {m.fingerprint}")
    if m.version or m.created:
        # Which version is in place (after a killed ingest: the old one, or the new one).
        lines.append(f"version      {m.version or '-'}, written {m.created or '-'}")
    if m.timings is not None:
        lines.append(f"ingest time  {m.timings.get('total', 0):.1f} s")
    return "\n".join(lines)
