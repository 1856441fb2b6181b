"""Tables in and out for the commands that use a model: ids from the command line or a file,
pairs and ratings files (CSV or Parquet, streamed), and results written as CSV on stdout or as
a CSV/Parquet file committed atomically (:func:`dmf.store.storage.atomic_file`). Every file may
be a local path (relative to the current directory) or a URL.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from dmf.config import is_url
from dmf.errors import InputError
from dmf.store.storage import Location, atomic_file, write_atomic

PARQUET_SUFFIXES = (".parquet", ".pq")


def parse_ids(text: str, what: str, options: dict | None = None) -> pa.Array:
    """Raw ids from ``a,b,c`` or from a file (path or URL): Parquet/CSV with a ``user``/``item``
    column (else its first column), or plain text with one id per line (an optional header)."""
    loc = _file_or_none(text, options)
    if loc is not None:
        if loc.name.endswith(PARQUET_SUFFIXES + (".csv",)):
            t = read_table_file(loc)
            col = what if what in t.column_names else t.column_names[0]
            return t.column(col).combine_chunks()
        lines = [s.strip() for s in loc.read_text().splitlines()]
        lines = [s for s in lines if s]
        if lines and lines[0] == what:
            lines = lines[1:]
        return pa.array(lines, type=pa.string())
    ids = [s.strip() for s in text.split(",") if s.strip()]
    if not ids:
        raise InputError(f"--{what}s {text!r}: no ids (give a,b,c or a file)")
    return pa.array(ids, type=pa.string())


def _file_or_none(text: str, options: dict | None) -> Location | None:
    """The file ``text`` names, if it is one (a list of ids like ``3,17`` is not)."""
    if not is_url(text) and not Path(text).is_file():
        return None
    loc = Location.of(text, options)
    return loc if loc.isfile() else None


def _existing(path: str | Location, options: dict | None = None) -> Location:
    loc = Location.of(path, options)
    if not loc.isfile():
        raise InputError(f"{loc} does not exist")
    return loc


def read_table_file(
    path: str | Location,
    column_types: dict[str, pa.DataType] | None = None,
    options: dict | None = None,
) -> pa.Table:
    """A whole CSV or Parquet file (by suffix), local or a URL."""
    loc = _existing(path, options)
    # A Python file object backs the readers: no Arrow threads (see
    # dmf.store.storage.read_verified_buffer).
    try:
        with loc.open("rb") as fh:
            if loc.name.endswith(PARQUET_SUFFIXES):
                with pq.ParquetFile(fh) as pf:
                    return pf.read(use_threads=False)
            return pcsv.read_csv(
                fh,
                read_options=pcsv.ReadOptions(use_threads=False),
                **csv_options(loc.name, column_types),
            )
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"cannot read {loc}: {exc}") from exc


def csv_options(name: str, column_types) -> dict[str, Any]:
    delim = "\t" if name.endswith((".tsv", ".tab")) else ","
    return {
        "parse_options": pcsv.ParseOptions(delimiter=delim),
        "convert_options": pcsv.ConvertOptions(column_types=column_types or {}),
    }


def check_columns(path, names: list[str], columns: list[str]) -> None:
    missing = [c for c in columns if c not in names]
    if missing:
        raise InputError(
            f"{path}: no column {missing[0]!r} (columns are {names}); "
            f"the file needs a header with {', '.join(columns)}"
        )


def read_columns(
    path: str | Location,
    columns: list[str],
    types: dict[str, pa.DataType],
    options: dict | None = None,
) -> pa.Table:
    t = read_table_file(path, types, options)
    check_columns(path, t.column_names, columns)
    return t.select(columns)


def iter_columns(
    path: str | Location,
    columns: list[str],
    types: dict[str, pa.DataType],
    batch_rows: int = 1 << 20,
    options: dict | None = None,
) -> Iterator[pa.Table]:
    """Stream ``columns`` of a CSV or Parquet file (local or a URL) in batches (bounded
    memory)."""
    loc = _existing(path, options)
    try:
        with loc.open("rb") as fh:
            if loc.name.endswith(PARQUET_SUFFIXES):
                pf = pq.ParquetFile(fh)
                check_columns(loc, pf.schema_arrow.names, columns)
                for b in pf.iter_batches(batch_size=batch_rows, columns=columns, use_threads=False):
                    yield pa.Table.from_batches([b])
                return
            reader = pcsv.open_csv(
                fh,
                read_options=pcsv.ReadOptions(block_size=1 << 24),
                **csv_options(loc.name, types),
            )
            check_columns(loc, reader.schema.names, columns)
            for b in reader:
                yield pa.Table.from_batches([b]).select(columns)
    except pa.ArrowInvalid as exc:
        raise InputError(f"cannot read {loc}: {exc}") from exc


def write_table(table: pa.Table, out: str | Location | None, options=None) -> None:
    write_stream(iter([table]), out, table.schema, options)


def write_stream(
    tables: Iterator[pa.Table], out: str | Location | None, schema=None, options=None
) -> None:
    """Write tables as CSV to stdout, or to ``out`` (Parquet or CSV by suffix) atomically."""
    if out is None:
        first = True
        for t in tables:
            pcsv.write_csv(t, sys.stdout.buffer, pcsv.WriteOptions(include_header=first))
            first = False
        sys.stdout.flush()
        return
    path = Location.of(out, options)
    parquet = path.name.endswith(PARQUET_SUFFIXES)
    with atomic_file(path) as fh:
        writer = None
        try:
            for t in tables:
                if writer is None:
                    writer = (
                        pq.ParquetWriter(fh, t.schema, compression="zstd")
                        if parquet
                        else pcsv.CSVWriter(fh, t.schema)
                    )
                writer.write_table(t)
            if writer is None:
                if schema is None:
                    raise InputError("no rows to write")
                writer = pq.ParquetWriter(fh, schema) if parquet else pcsv.CSVWriter(fh, schema)
        finally:
            if writer is not None:
                writer.close()
    print(f"dmf: wrote {path}", file=sys.stderr)


def write_json(path: str | Location, doc: Any) -> None:
    """``doc`` as indented JSON, written atomically."""
    write_atomic(path, json.dumps(doc, indent=1))
