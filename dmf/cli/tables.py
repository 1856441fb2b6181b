"""Tables in and out for the commands that use a model: ids from the command line or a file,
pairs and ratings files (CSV or Parquet, streamed), and results written as CSV on stdout or as
a CSV/Parquet file committed atomically (:func:`dmf.store.storage.atomic_file`).
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

from dmf.errors import InputError
from dmf.store.storage import atomic_file, write_atomic

PARQUET_SUFFIXES = (".parquet", ".pq")


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
        return pcsv.read_csv(path, **csv_options(path, column_types))
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from exc


def csv_options(path: Path, column_types) -> dict[str, Any]:
    delim = "\t" if path.suffix in (".tsv", ".tab") else ","
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


def read_columns(path: str | Path, columns: list[str], types: dict[str, pa.DataType]) -> pa.Table:
    t = read_table_file(path, types)
    check_columns(path, t.column_names, columns)
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
            check_columns(path, pf.schema_arrow.names, columns)
            for b in pf.iter_batches(batch_size=batch_rows, columns=columns):
                yield pa.Table.from_batches([b])
            return
        opts = csv_options(path, types)
        reader = pcsv.open_csv(
            path,
            read_options=pcsv.ReadOptions(block_size=1 << 24),
            **opts,
        )
        check_columns(path, reader.schema.names, columns)
        for b in reader:
            yield pa.Table.from_batches([b]).select(columns)
    except pa.ArrowInvalid as exc:
        raise InputError(f"cannot read {path}: {exc}") from exc


def write_table(table: pa.Table, out: str | None) -> None:
    write_stream(iter([table]), out, table.schema)


def write_stream(tables: Iterator[pa.Table], out: str | None, schema=None) -> None:
    """Write tables as CSV to stdout, or to ``out`` (Parquet or CSV by suffix) atomically."""
    if out is None:
        first = True
        for t in tables:
            pcsv.write_csv(t, sys.stdout.buffer, pcsv.WriteOptions(include_header=first))
            first = False
        sys.stdout.flush()
        return
    path = Path(out)
    parquet = path.suffix in PARQUET_SUFFIXES
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


def write_json(path: str | Path, doc: Any) -> None:
    """``doc`` as indented JSON, written atomically."""
    write_atomic(path, json.dumps(doc, indent=1))
