"""Reading raw ratings in streaming batches: CSV/TSV (any delimiter, gzip/zstd) and Parquet.

:func:`resolve_inputs` turns the ``data`` config section into an :class:`InputSpec` (the files,
their format and compression, which columns hold user, item, rating and timestamp; an input
without a rating column, ``data.columns.rating: null``, is events that count 1 each).
:func:`iter_batches` then yields :class:`Batch` objects of about ``data.batch_rows`` rows each,
never the whole input:

- CSV goes through :func:`pyarrow.csv.open_csv` with a block size estimated from the first lines.
  Multi-character delimiters (MovieLens 1M/10M's ``::``) are translated to one byte by a streaming
  wrapper, since Arrow's parser takes one-character delimiters only.
- Compression (gzip, zstd) is detected from the magic bytes or the suffix and decoded by
  :class:`pyarrow.CompressedInputStream`.
- Parquet files are read with :meth:`pyarrow.parquet.ParquetFile.iter_batches`.

Sources are local paths or URLs (``s3://bucket/ratings/*.csv``), reached through
:class:`dmf.store.storage.Location` (fsspec, with ``storage.options``): a file, a directory (a
prefix) or a glob. A local file is read by Arrow directly; a remote one through its fsspec file
object, wrapped for Arrow (:class:`pyarrow.PythonFile`; Parquet through
:meth:`Location.arrow <dmf.store.storage.Location.arrow>` for random access). A directory written
by ``dmf synth`` (it holds ``synth.json``), or its ``ratings`` directory, is read through that
manifest's list of files: its file names carry a version token, and files no manifest lists
(left by an interrupted synth) are not data.

Raw ids are read as ``data.id_type`` says (:func:`_check_ids`). CSV ids are read as text and
become integers only when each is a canonical integer ("7", never "007" or "+7"), so two ids
that differ as text are never merged; ``auto`` decides this over the whole input, re-reading it
with a side as strings when a later id is not such an integer (:class:`IdTypeMismatch`). Float
ids must be whole and within int64, and no string id may be longer than ``data.max_id_length``
bytes.

Every error the input can cause is an :class:`~dmf.errors.InputError` naming the file, the line
(CSV, 1-based, counting the header) or row (Parquet, 1-based) and the column. Arrow reports parse
errors without a line number, so on such an error the file is re-scanned line by line (slowly,
once) to find and name the offending line.
"""

from __future__ import annotations

import csv
import glob
import io
import os
import posixpath
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from dmf.config import DataConfig
from dmf.errors import InputError
from dmf.store.storage import Location, StorageError, entries_of, read_manifest

ID_FIELDS = ("user", "item")

# The byte a multi-character delimiter is translated to (ASCII "unit separator": never in text).
_SUBST = b"\x1f"
_SNIFF_BYTES = 1 << 16
_SNIFF_LINES = 500

PRESETS: dict[str, dict] = {
    "movielens-100k": {
        "file": "u.data",
        "subdirs": ["ml-100k"],
        "delimiter": "\t",
        "header": False,
        "columns": {"user": 0, "item": 1, "rating": 2, "timestamp": 3},
    },
    "movielens-1m": {
        "file": "ratings.dat",
        "subdirs": ["ml-1m"],
        "delimiter": "::",
        "header": False,
        "columns": {"user": 0, "item": 1, "rating": 2, "timestamp": 3},
    },
    "movielens-10m": {
        "file": "ratings.dat",
        # The 10M archive unpacks to ml-10M100K, not ml-10m.
        "subdirs": ["ml-10M100K", "ml-10m"],
        "delimiter": "::",
        "header": False,
        "columns": {"user": 0, "item": 1, "rating": 2, "timestamp": 3},
    },
    **{
        f"movielens-{v}": {
            "file": "ratings.csv",
            "subdirs": [f"ml-{v}"],
            "delimiter": ",",
            "header": True,
            "columns": {
                "user": "userId",
                "item": "movieId",
                "rating": "rating",
                "timestamp": "timestamp",
            },
        }
        for v in ("20m", "25m", "32m")
    },
}

_PARQUET_SUFFIXES = (".parquet", ".pq", ".parq")
_TEXT_SUFFIXES = (".csv", ".tsv", ".tab", ".dat", ".data", ".txt")
_COMPRESSION_SUFFIXES = {".gz": "gzip", ".gzip": "gzip", ".zst": "zstd", ".zstd": "zstd"}
# The manifest of a directory written by dmf synth (dmf.data.synth).
SYNTH_MANIFEST = "synth.json"


class IdTypeMismatch(Exception):
    """Ids of ``side`` were read as integers but a later value is not one: re-read as strings."""

    def __init__(self, side: str):
        super().__init__(side)
        self.side = side


@dataclass(frozen=True)
class InputFile:
    path: Location
    """A local path (absolute) or a URL, with its storage options; ``str()`` names it."""
    format: str  # "csv" or "parquet"
    compression: str | None  # None, "gzip" or "zstd"


@dataclass
class InputSpec:
    """What to read and how (from the ``data`` config section, with a preset applied)."""

    files: list[InputFile]
    delimiter: str | None
    header: bool | str
    columns: dict[str, str | int]
    """Field -> column name or 0-based position; rating and timestamp may be absent (no rating
    column: every event counts 1)."""
    batch_rows: int
    preset: str | None = None
    id_type: str = "auto"
    """``data.id_type``: ``auto``, ``int`` or ``string``."""
    max_id_length: int = 1024
    """``data.max_id_length``, in UTF-8 bytes."""
    id_types: dict[str, str] = field(default_factory=dict)
    """Each side's id type, ``int`` or ``string``: set from the start unless ``id_type`` is
    ``auto``; then settled by the first batch, and turned to ``string`` (the input re-read)
    when a later id is not an integer (:class:`IdTypeMismatch`)."""

    @property
    def has_timestamp(self) -> bool:
        return "timestamp" in self.columns

    @property
    def has_rating(self) -> bool:
        """Whether the input has a rating column (``data.columns.rating`` is not null)."""
        return "rating" in self.columns

    def describe(self) -> dict:
        return {
            "files": [str(f.path) for f in self.files],
            "formats": sorted({f.format for f in self.files}),
            "compression": sorted({f.compression or "none" for f in self.files}),
            "delimiter": self.delimiter,
            "columns": dict(self.columns),
            "preset": self.preset,
            "id_types": dict(self.id_types),
        }


@dataclass
class Batch:
    """About ``batch_rows`` consecutive rows of one input file.

    Attributes
    ----------
    user, item
        Raw ids, shape (n,): ``pa.int64()`` or ``pa.string()`` arrays without nulls.
    rating
        float64, shape (n,); NaN where the input had a null or NaN (cleaned by ingest's policies).
        All 1.0 when the input has no rating column (``data.columns.rating: null``).
    timestamp
        int64, shape (n,), or None when the input has none.
    """

    file: str
    kind: str  # "line" (CSV) or "row" (Parquet)
    first: int  # line/row number (1-based) of the batch's first row
    user: pa.Array
    item: pa.Array
    rating: np.ndarray
    timestamp: np.ndarray | None
    colnames: dict[str, str]

    def __len__(self) -> int:
        return len(self.rating)

    def where(self, k: int, fld: str | None = None) -> str:
        """'FILE, line N, column 'rating' (data.columns.rating)' for row ``k`` of the batch."""
        s = f"{self.file}, {self.kind} {self.first + int(k)}"
        if fld is not None and fld in self.colnames:
            s += f", column {self.colnames[fld]!r} (data.columns.{fld})"
        elif fld is not None:  # no such column: the rating of data.columns.rating: null
            s += f" (no {fld} column: data.columns.{fld} is null)"
        return s


# -- resolving the input files ------------------------------------------------------------------


def _has_magic(s: str) -> bool:
    return any(c in s for c in "*?[")


def _input_stream(f: InputFile, buffer_size: int | None = None):
    """The decompressed contents of ``f`` as an Arrow input stream: a local file read by Arrow
    itself; a URL's fsspec file object wrapped for Arrow."""
    source = f.path.url if f.path.is_local else pa.PythonFile(f.path.open("rb"), mode="r")
    return pa.input_stream(source, compression=f.compression, buffer_size=buffer_size)


def _head(loc: Location, n: int) -> bytes:
    """The first ``n`` bytes of the file ``loc``."""
    if loc.is_local:
        with open(loc.url, "rb") as f:
            return f.read(n)
    try:
        with loc.open("rb") as f:
            return f.read(n)
    except (OSError, StorageError) as exc:
        raise InputError(f"{loc}: cannot read: {exc}") from exc


def _suffix(loc: Location) -> str:
    return posixpath.splitext(loc.name)[1].lower()


def _compression_of(path: Location, configured: str) -> str | None:
    if configured == "none":
        return None
    if configured in ("gzip", "zstd"):
        return configured
    head = _head(path, 4)
    if head[:2] == b"\x1f\x8b":
        return "gzip"
    if head == b"\x28\xb5\x2f\xfd":
        return "zstd"
    return _COMPRESSION_SUFFIXES.get(_suffix(path))


def _format_of(path: Location, configured: str) -> str:
    if configured == "parquet":
        return "parquet"
    if configured in ("csv", "tsv"):
        return "csv"
    name = path.name.lower()
    for suf in _COMPRESSION_SUFFIXES:
        if name.endswith(suf):
            name = name[: -len(suf)]
    if name.endswith(_PARQUET_SUFFIXES):
        return "parquet"
    if path.isfile() and _head(path, 4) == b"PAR1":
        return "parquet"
    return "csv"


def _dir_files(d: Location) -> list[Location]:
    out = []
    # Sorted by path components, as pathlib sorts: "a/b.csv" before "a-c.csv".
    for rel in sorted(d.files(), key=lambda r: r.split("/")):
        parts = rel.split("/")
        if any(part.startswith((".", "_")) for part in parts):
            continue
        name = parts[-1].lower()
        for suf in _COMPRESSION_SUFFIXES:
            if name.endswith(suf):
                name = name[: -len(suf)]
        if name.endswith(_PARQUET_SUFFIXES + _TEXT_SUFFIXES):
            out.append(d / rel)
    return out


def _synth_files(d: Location) -> list[Location] | None:
    """The rating files of ``d`` when it is the output of ``dmf synth`` (it holds
    ``synth.json``) or that output's ratings directory, as its manifest lists them; None when it
    is neither (or was written by a dmf that did not version its files)."""
    doc = read_manifest(d, SYNTH_MANIFEST, InputError)
    root = d
    if doc is not None:
        sub = doc.get("ratings", "ratings")
    else:
        if not d.is_local and "/" not in d.path.strip("/"):
            return None  # a bucket has no parent
        try:
            doc = read_manifest(d.parent, SYNTH_MANIFEST, InputError)
        except InputError:
            return None  # not ours to read: d is an ordinary directory
        if doc is None or doc.get("ratings", "ratings") != d.name:
            return None
        root, sub = d.parent, d.name
    if not isinstance(doc.get("files"), dict):
        return None
    try:
        entries = entries_of(doc)
    except ValueError as exc:
        raise InputError(f"{root / SYNTH_MANIFEST} is not a valid synth manifest: {exc}") from None
    return [
        root / (e.path or rel) for rel, e in sorted(entries.items()) if rel.startswith(sub + "/")
    ]


def _glob(p: Location) -> list[Location]:
    """The files matching the pattern ``p``, sorted."""
    if p.is_local:
        found = [Path(x) for x in sorted(glob.glob(p.url, recursive=True))]
        return [Location.of(x) for x in found if x.is_file()]
    try:
        hits = p.fs.glob(p.path, detail=True)
    except Exception as exc:  # noqa: BLE001 - network, permissions: name the pattern
        raise InputError(f"data.source {p}: cannot list: {type(exc).__name__}: {exc}") from exc
    return [
        Location(f"{p.protocol}://{name}", p.options)
        for name, info in sorted(hits.items())
        if info.get("type") == "file"
    ]


def _preset_file(source: Location, preset: str) -> Location:
    spec = PRESETS[preset]
    if source.isfile():
        return source
    if source.isdir():
        for cand in [source, *(source / s for s in spec["subdirs"])]:
            if (cand / spec["file"]).isfile():
                return cand / spec["file"]
    raise InputError(
        f"data.source {source}: no {spec['file']} found for data.preset {preset} (looked in "
        f"{source} and {', '.join(spec['subdirs'])} below it); point data.source at the "
        "directory the archive unpacked to, or at the file (`dmf data movielens` downloads it)"
    )


def _source_files(s: str, p: Location, preset: str | None) -> list[Location]:
    """The rating files of ``s``, one entry of data.source (``p``: where it is)."""
    if preset is not None and not _has_magic(s):
        return [_preset_file(p, preset)]
    if _has_magic(s):
        found = _glob(p)
        if not found:
            raise InputError(f"data.source {s!r}: the pattern {p} matches no files")
        return found
    if p.isdir():
        found = _synth_files(p)
        if found is None:
            found = _dir_files(p)
        if not found:
            raise InputError(
                f"data.source {s!r}: directory {p} has no rating files "
                f"(*.csv, *.tsv, *.dat, *.parquet, optionally .gz/.zst)"
            )
        return found
    if p.isfile():
        return [p]
    raise InputError(f"data.source {s!r}: {p} does not exist")


def resolve_inputs(
    data: DataConfig,
    resolve: Callable[[str], str | os.PathLike],
    options: Mapping[str, Any] | None = None,
) -> InputSpec:
    """The files and reading options described by the ``data`` config section.

    Parameters
    ----------
    data
        The ``data`` section. Its ``source`` must be set: a default source (such as the output
        of ``synth`` for ``dmf run``) is the caller's decision.
    resolve
        Turns a path written in the config into an absolute local path or a URL, e.g.
        :meth:`dmf.config.Config.resolve` (relative to the config file's directory).
    options
        Storage options of the filesystem of URL sources (``config.storage.options``).

    Raises
    ------
    InputError
        No source, or a source that names no rating files.
    """
    if data.source is None:
        raise InputError("data.source is not set: give a file, directory or glob of ratings")
    sources = [data.source] if isinstance(data.source, str) else list(data.source)
    if not sources:
        raise InputError("data.source is an empty list: give at least one file")
    try:
        paths = [
            p
            for s in sources
            for p in _source_files(s, Location.of(resolve(s), options), data.preset)
        ]
    except StorageError as exc:  # a URL that cannot be reached: say which
        raise InputError(f"data.source: {exc}") from exc
    columns: dict[str, str | int] = {
        k: v for k, v in data.columns.model_dump().items() if v is not None
    }
    fmt, delimiter, header = data.format, data.delimiter, data.header
    if data.preset is not None:
        ps = PRESETS[data.preset]
        fmt, delimiter, header = "csv", ps["delimiter"], ps["header"]
        columns = dict(ps["columns"])
    if fmt == "tsv" and delimiter is None:
        delimiter = "\t"
    files = [InputFile(p, _format_of(p, fmt), _compression_of(p, data.compression)) for p in paths]
    return InputSpec(
        files=files,
        delimiter=delimiter,
        header=header,
        columns=columns,
        batch_rows=data.batch_rows,
        preset=data.preset,
        id_type=data.id_type,
        max_id_length=data.max_id_length,
        id_types={} if data.id_type == "auto" else dict.fromkeys(ID_FIELDS, data.id_type),
    )


# -- byte streams -------------------------------------------------------------------------------


class _DelimiterTranslator(io.RawIOBase):
    """A read-only stream that replaces a multi-byte delimiter by one byte, chunk by chunk.

    A delimiter cut in two by a chunk boundary is handled by holding back the chunk's tail when it
    is a proper prefix of the delimiter.
    """

    def __init__(self, raw, delim: bytes, chunk: int = 1 << 20):
        self.raw = raw
        self.delim = delim
        self.chunk = chunk
        self.pending = b""
        self.buf = b""
        self.eof = False

    def readable(self) -> bool:
        return True

    def _fill(self, n: int) -> None:
        while len(self.buf) < n and not self.eof:
            data = self.raw.read(max(self.chunk, min(n, 1 << 26)))
            if not data:
                self.eof = True
                self.buf += self.pending
                self.pending = b""
                break
            # Translate first, then hold back a tail that may be the start of a delimiter
            # continued in the next chunk (a complete delimiter is already translated).
            data = (self.pending + data).replace(self.delim, _SUBST)
            keep = 0
            for k in range(len(self.delim) - 1, 0, -1):
                if data.endswith(self.delim[:k]):
                    keep = k
                    break
            self.pending = data[len(data) - keep :] if keep else b""
            self.buf += data[: len(data) - keep] if keep else data

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            self._fill(1 << 62)
            out, self.buf = self.buf, b""
            return out
        self._fill(n)
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        try:
            self.raw.close()
        finally:
            super().close()


def open_text_stream(f: InputFile, delimiter: str | None):
    """A byte stream of ``f``'s decompressed contents, with a multi-byte delimiter translated."""
    try:
        raw = _input_stream(f, buffer_size=1 << 20)
    except (OSError, pa.ArrowException, StorageError) as exc:
        raise InputError(f"{f.path}: cannot open: {exc}") from exc
    if delimiter is not None and len(delimiter.encode()) > 1:
        return _DelimiterTranslator(raw, delimiter.encode())
    return raw


def _effective_delimiter(delimiter: str) -> str:
    return _SUBST.decode() if len(delimiter.encode()) > 1 else delimiter


# -- sniffing a CSV file's first lines ----------------------------------------------------------


@dataclass
class _CsvLayout:
    delimiter: str  # as configured (may be multi-character)
    header: bool
    names: list[str]  # column names as Arrow will see them
    display: list[str]  # names for messages (header names, or "#3")
    select: dict[str, str]  # field -> Arrow column name
    types: dict[str, pa.DataType]
    avg_line: float
    max_line: int


def _sniff_lines(f: InputFile) -> tuple[list[bytes], bool]:
    """The first lines of the decompressed file (raw bytes, no newline); and whether EOF was hit."""
    try:
        s = _input_stream(f)
        data = s.read(_SNIFF_BYTES)
        more = bool(s.read(1))
        s.close()
    except (OSError, pa.ArrowException, StorageError) as exc:
        raise InputError(
            f"{f.path}: cannot read ({f.compression or 'uncompressed'}): {exc}"
        ) from exc
    lines = data.split(b"\n")
    if more and len(lines) > 1:
        lines = lines[:-1]  # the last one may be cut off
    lines = [ln.rstrip(b"\r") for ln in lines]
    if lines and lines[0].startswith(b"\xef\xbb\xbf"):
        lines[0] = lines[0][3:]  # a UTF-8 byte order mark (Arrow skips it too)
    while lines and not lines[-1].strip():
        lines.pop()
    return lines[:_SNIFF_LINES], not more


def _split_line(line: bytes, delimiter: str) -> list[str]:
    """The fields of one line, as Python's csv module splits them.

    Raises
    ------
    csv.Error
        A quoted field longer than the csv module's limit (``csv.field_size_limit()``, 128 KiB);
        an unquoted one is split on the delimiter instead, which is what csv would do.
    """
    text = line.decode("utf-8", errors="surrogateescape")
    if len(delimiter) > 1:
        text = text.replace(delimiter, _SUBST.decode())
        delimiter = _SUBST.decode()
    try:
        return next(csv.reader([text], delimiter=delimiter), [])
    except csv.Error:
        if '"' in text:
            raise
        return text.split(delimiter)


def _split_lines(lines: list[bytes], delimiter: str) -> list[list[str]]:
    """The fields of each line (:func:`_split_line`); a line it cannot split gives none."""
    out = []
    for ln in lines:
        try:
            out.append(_split_line(ln, delimiter))
        except csv.Error:
            out.append([])
    return out


def _is_int(s: str) -> bool:
    """Whether Arrow reads ``s`` as an int64 (ASCII digits, an optional '-')."""
    return re.fullmatch(r"-?[0-9]+", s) is not None


def _is_float(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _sniff_delimiter(first: bytes) -> str:
    for cand in ("::", "\t", ",", ";", "|"):
        if cand.encode() in first:
            return cand
    return ","


def _has_header(
    f: InputFile, spec: InputSpec, first: list[str], rest: Callable[[], list[list[str]]] = list
) -> bool:
    """Whether the file starts with a header line (``first``: its first line's fields;
    ``rest()``: those of the next lines sniffed)."""
    named = any(isinstance(v, str) for v in spec.columns.values())
    header = spec.header
    if header == "auto":
        if named:
            return True
        # Columns by position: a header unless the rating column of line 1 is a number.
        pos = spec.columns.get("rating")
        if pos is None:
            return _header_without_ratings(f, spec, first, rest())
        return not (isinstance(pos, int) and pos < len(first) and _is_float(first[pos]))
    if named and not header:
        bad = [k for k, v in spec.columns.items() if isinstance(v, str)]
        raise InputError(
            f"{f.path}: data.columns.{bad[0]} is the name {spec.columns[bad[0]]!r}, but "
            "data.header is false: give 0-based column positions for a file without a header"
        )
    return bool(header)


def _header_without_ratings(
    f: InputFile, spec: InputSpec, first: list[str], rest: list[list[str]]
) -> bool:
    """``data.header: auto`` with columns by position and no rating column: line 1 is data
    when it looks like data (both ids, or the timestamp, are numbers), a header when it does
    not but the next lines do; ids and timestamps that are text throughout (or a file of one
    line) leave no way to tell."""
    ids = [spec.columns[fld] for fld in ID_FIELDS]
    t = spec.columns.get("timestamp")

    def numbers(fields: list[str], cols: list) -> bool:
        return all(isinstance(p, int) and p < len(fields) and _is_float(fields[p]) for p in cols)

    def data_like(fields: list[str]) -> bool:
        return numbers(fields, ids) or (t is not None and numbers(fields, [t]))

    if data_like(first):
        return False
    if any(rest) and all(data_like(r) for r in rest if r):
        return True
    raise InputError(
        f"{f.path}: cannot tell whether line 1 is a header (data.header is auto, the columns "
        "are positions, there is no rating column, and the ids and timestamps are not all "
        "numbers): set data.header to true or false"
    )


def _select_columns(
    f: InputFile, spec: InputSpec, first: list[str], names: list[str], display: list[str], hint: str
) -> tuple[dict[str, str], dict[str, str]]:
    """Arrow's column name of every configured field, and its name for messages.

    ``first``: the fields of line 1; ``names`` and ``display``: the column names Arrow and
    messages use; ``hint``: a sentence on the delimiter, added to errors.
    """
    select: dict[str, str] = {}
    disp: dict[str, str] = {}
    for fld, col in spec.columns.items():
        if isinstance(col, int):
            if col >= len(names):
                raise InputError(
                    f"{f.path}: data.columns.{fld} is position {col}, but line 1 has only "
                    f"{len(names)} column(s): {display}.{hint}"
                )
            select[fld] = names[col]
            disp[fld] = display[col]
            continue
        if col not in names:
            no_header = (
                " The first line looks like data, not a header: give data.columns as 0-based "
                "positions (and data.header: false)."
                if len(first) > 1 and all(_is_float(x) for x in first if x)
                else ""
            )
            raise InputError(
                f"{f.path}: column {col!r} (data.columns.{fld}) not found in the header; "
                f"columns found: {', '.join(repr(n) for n in names)}.{hint}{no_header}"
            )
        select[fld] = col
        disp[fld] = col
    if len(set(select.values())) < len(select):
        raise InputError(f"{f.path}: data.columns maps two fields to the same column: {disp}")
    return select, disp


def _sampled_types(
    rows: list[list[str]], names: list[str], select: dict[str, str]
) -> dict[str, pa.DataType]:
    """Arrow types of the fields: ids are read as text, their type decided over the whole input
    (:func:`_ids_of_text`); ratings as float64; timestamps as int64, float64 or dates, from a
    sample of rows."""
    types: dict[str, pa.DataType] = {"rating": pa.float64()}
    types.update(dict.fromkeys(ID_FIELDS, pa.string()))
    if "timestamp" in select:
        k = names.index(select["timestamp"])
        vals = [r[k] for r in rows if k < len(r) and r[k] != ""]
        if all(_is_int(v) for v in vals):
            types["timestamp"] = pa.int64()
        elif all(_is_float(v) for v in vals):
            types["timestamp"] = pa.float64()
        else:
            types["timestamp"] = pa.timestamp("s")
    return types


def _sniff_csv(f: InputFile, spec: InputSpec) -> tuple[_CsvLayout, dict[str, str]]:
    """How to read the CSV file ``f``, from its first lines; and each field's column name for
    messages."""
    lines, _ = _sniff_lines(f)
    if not lines:
        raise InputError(f"{f.path}: the file is empty (no ratings)")
    delimiter = spec.delimiter or _sniff_delimiter(lines[0])
    first = _split_line(lines[0], delimiter)
    header = _has_header(f, spec, first, lambda: _split_lines(lines[1:50], delimiter))
    ncols = len(first)
    hint = (
        f" Only one column was found: is the delimiter right (data.delimiter, now {delimiter!r})?"
        if ncols == 1
        else ""
    )
    if header:
        names = first
        display = list(first)
    else:
        names = [f"f{k}" for k in range(ncols)]
        display = [f"#{k}" for k in range(ncols)]
    select, disp = _select_columns(f, spec, first, names, display, hint)
    body = lines[1:] if header else lines
    types = _sampled_types([_split_line(ln, delimiter) for ln in body], names, select)
    sizes = [len(ln) + 1 for ln in lines]
    return _CsvLayout(
        delimiter=delimiter,
        header=header,
        names=names,
        display=display,
        select=select,
        types=types,
        avg_line=sum(sizes) / len(sizes),
        max_line=max(sizes),
    ), disp


# -- diagnosing a CSV error at a line ---------------------------------------------------------


def _diagnose_csv(
    f: InputFile,
    layout: _CsvLayout,
    disp: dict[str, str],
    types: dict[str, pa.DataType],
    max_id_length: int,
) -> str | None:
    """Scan the file line by line for the first line Arrow could not read (or whose id is
    longer than ``max_id_length`` bytes, which an Arrow error later in the block would hide).

    Returns the message naming that line, or None when nothing is found. Slow (Python per line),
    but only run once, after Arrow reported an error.
    """
    ncols = len(layout.names)
    idx = {fld: layout.names.index(col) for fld, col in layout.select.items()}
    stream = _input_stream(f)
    try:
        reader = io.BufferedReader(_PyStream(stream), buffer_size=1 << 20)
        for lineno, line in enumerate(reader, start=1):
            if lineno == 1 and layout.header:
                continue
            line = line.rstrip(b"\r\n")
            if not line:
                continue
            try:
                fields = _split_line(line, layout.delimiter)
            except csv.Error as exc:
                return (
                    f"{f.path}, line {lineno}: cannot split the line into fields ({exc}); ids "
                    f"may be at most data.max_id_length = {max_id_length} bytes: {line[:200]!r}"
                )
            if len(fields) != ncols:
                return (
                    f"{f.path}, line {lineno}: {len(fields)} field(s), expected {ncols} "
                    f"as on line 1 (ragged row, or a wrong delimiter: data.delimiter is "
                    f"{layout.delimiter!r}): {line[:200]!r}"
                )
            for fld, k in idx.items():
                found = _diagnose_field(fields[k], fld, types.get(fld), max_id_length)
                if found is not None:
                    where = f"{f.path}, line {lineno}, column {disp[fld]!r} (data.columns.{fld})"
                    return f"{where}: {found}"
        return None
    finally:
        stream.close()


def _diagnose_field(v: str, fld: str, t: pa.DataType | None, max_id_length: int) -> str | None:
    """What is wrong with the text ``v`` of field ``fld`` read as Arrow type ``t``, or None."""
    try:
        n = len(v.encode("utf-8"))
    except UnicodeEncodeError:
        return (
            f"bytes that are not UTF-8: {v.encode('utf-8', errors='surrogateescape')[:100]!r}; "
            "re-encode the file as UTF-8"
        )
    if v == "":
        return None
    if fld in ID_FIELDS and n > max_id_length:
        return _too_long(v, n, max_id_length)
    if t == pa.int64() and not _is_int(v):
        return f"{v!r} is not an integer"
    if t == pa.float64() and not _is_float(v):
        return f"{v!r} is not a number"
    return None


def _too_long(v: str, n: int, max_id_length: int) -> str:
    """The message for an id ``v`` of ``n`` bytes, over ``data.max_id_length``."""
    return (
        f"an id of {n} bytes ({v[:40]!r}...) is longer than data.max_id_length "
        f"({max_id_length} bytes); raise it if such ids are meant"
    )


class _PyStream(io.RawIOBase):
    """An Arrow input stream as a Python raw stream (for line iteration)."""

    def __init__(self, s):
        self.s = s

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.s.read(len(b))
        b[: len(data)] = data
        return len(data)


# -- batches --------------------------------------------------------------------------------------


# Text that is an integer exactly as str(int) writes it: the only integer ids ``auto`` accepts.
_CANONICAL_INT = r"^(0|-?[1-9][0-9]*)$"
# A number written with a decimal point or an exponent, in ASCII: "3.0", "-.5", "1e19".
_FLOAT_TEXT = r"^[-+]?(([0-9]+\.[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?|[0-9]+[eE][-+]?[0-9]+)$"
_INT64_MAX_TEXT = str(2**63 - 1)
_INT64_MIN_TEXT = str(-(2**63))


def _mask(arr: pa.Array) -> np.ndarray:
    """A boolean Arrow array without nulls as a NumPy one."""
    return np.asarray(arr.to_numpy(zero_copy_only=False), dtype=bool)


def _check_ids(b: Batch, fld: str, arr: pa.Array, spec: InputSpec, text: bool) -> pa.Array:
    """The ids ``arr`` of ``fld`` as an int64 or a string array, as ``data.id_type`` says.

    ``text``: the ids are text as written in a CSV file, whose type is decided here, batch by
    batch (:func:`_ids_of_text`). A Parquet column's type is its writer's: integers stay integers
    and strings stay strings, unless ``data.id_type`` is ``int`` (strings must then be
    integers) or ``string`` (:func:`_unify_ids` writes integers in decimal). Floats must be whole
    and within int64. Null and empty ids, ids longer than ``data.max_id_length`` bytes and ids
    with a NUL byte are errors naming the line or row.
    """
    if arr.null_count:
        k = int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])
        raise InputError(f"{b.where(k, fld)}: the id is missing (null or empty)")
    t = arr.type
    if pa.types.is_floating(t):
        v = arr.to_numpy(zero_copy_only=False)
        return pa.array(_whole(b, fld, v, np.arange(len(v)), lambda k: repr(float(v[k]))))
    if pa.types.is_integer(t):
        return _integer_ids(b, fld, arr, spec)
    if pa.types.is_dictionary(t):
        return _check_ids(b, fld, arr.cast(t.value_type), spec, text)
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        arr = arr.cast(pa.string()) if t != pa.string() else arr
        parse = spec.id_types.get(fld) != "string" and (text or spec.id_type == "int")
        ints = _canonical_ints(arr) if parse else None
        if ints is not None:
            return ints
        n = pc.binary_length(arr).to_numpy()
        # Ids are text: a NUL byte in one is binary data read as text.
        nul = _mask(pc.match_substring(arr, "\x00"))
        bad = (n == 0) | (n > spec.max_id_length) | nul
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            if n[k] == 0:
                raise InputError(f"{b.where(k, fld)}: the id is missing (empty)")
            if n[k] > spec.max_id_length:
                v = arr[k].as_py()
                raise InputError(
                    f"{b.where(k, fld)}: {_too_long(v, int(n[k]), spec.max_id_length)}"
                )
            raise InputError(f"{b.where(k, fld)}: the id {arr[k].as_py()!r} contains a NUL byte")
        return _ids_of_text(b, fld, arr, spec) if parse else arr
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        try:
            return _check_ids(b, fld, arr.cast(pa.string()), spec, text)
        except pa.ArrowInvalid as exc:
            raise InputError(
                f"{b.file}, column {b.colnames[fld]!r} (data.columns.{fld}): ids are bytes that "
                f"are not UTF-8 ({exc})"
            ) from None
    raise InputError(
        f"{b.file}, column {b.colnames[fld]!r} (data.columns.{fld}): ids of type {t} are not "
        "supported; use integers or strings"
    )


def _whole(
    b: Batch, fld: str, v: np.ndarray, rows: np.ndarray, shown: Callable[[int], str]
) -> np.ndarray:
    """Float ids ``v`` (of the batch's rows ``rows``) as int64, shape (n,): each must be whole
    and within int64, never wrapped (``shown(k)``: id ``k`` as the message writes it)."""
    bad = ~np.isfinite(v) | (v != np.floor(v)) | (v < -(2.0**63)) | (v >= 2.0**63)
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        x = float(v[k])
        why = (
            "is not finite"
            if not np.isfinite(x)
            else "is fractional"
            if x != np.floor(x)
            else "is outside the int64 range"
        )
        raise InputError(
            f"{b.where(int(rows[k]), fld)}: id {shown(k)} {why}; ids must be integers (within "
            "int64) or strings"
        )
    return v.astype(np.int64)


def _integer_ids(b: Batch, fld: str, arr: pa.Array, spec: InputSpec) -> pa.Array:
    """An integer column's ids as int64; uint64 ones beyond int64 as their decimal text (the
    side is then read as strings), or an error if ``data.id_type`` is ``int``."""
    if arr.type == pa.int64():
        return arr
    over = pc.greater(arr, 2**63 - 1) if arr.type == pa.uint64() else None
    if over is None or not pc.any(over).as_py():
        return arr.cast(pa.int64())
    if spec.id_type == "int":
        k = int(np.flatnonzero(_mask(over))[0])
        raise InputError(
            f"{b.where(k, fld)}: id {arr[k].as_py()} is outside the int64 range of integer ids; "
            "set data.id_type: string (or auto) to read the ids as strings"
        )
    return arr.cast(pa.string())


def _canonical_ints(arr: pa.Array) -> pa.Array | None:
    """The strings ``arr`` as int64 when each is a canonical integer within int64, else None.

    The common case, at the cost of two casts: Arrow parses every id, and each is its value's
    decimal text (Arrow's parser alone also takes "007", "-0" and "0x1F").
    """
    try:
        ints = arr.cast(pa.int64())
    except pa.ArrowInvalid:
        return None
    return ints if pc.all(pc.equal(ints.cast(pa.string()), arr)).as_py() else None


def _ids_of_text(b: Batch, fld: str, arr: pa.Array, spec: InputSpec) -> pa.Array:
    """Ids as written (strings, none empty), not all of them canonical integers within int64
    (:func:`_canonical_ints`), so never all read as integers: "007" is not 7.

    With ``data.id_type: int``, an error naming the first id that is not such an integer. With
    ``auto``, ``arr`` itself when an id is neither such an integer nor a number written with a
    decimal point or an exponent (the side is then read as strings: :func:`_unify_ids`); else
    the numbers, each of which must be whole (``3.0`` is 3) and within int64.
    """
    pattern = _mask(pc.match_substring_regex(arr, _CANONICAL_INT))
    beyond = pattern & _beyond_int64(arr)
    canonical = pattern & ~beyond
    if spec.id_type == "int":
        k = int(np.flatnonzero(~canonical)[0])
        why = (
            "is outside the int64 range of integer ids"
            if beyond[k]
            else "is not a plain integer (ASCII digits without a leading zero, after an "
            "optional '-'; 0 itself but not -0)"
        )
        raise InputError(
            f"{b.where(k, fld)}: id {arr[k].as_py()!r} {why}; data.id_type is int: set it to "
            "auto or string to read such ids as strings"
        )
    floats = _mask(pc.match_substring_regex(arr, _FLOAT_TEXT))
    if not (canonical | floats).all():
        return arr
    out = np.empty(len(arr), dtype=np.int64)
    out[canonical] = arr.filter(pa.array(canonical)).cast(pa.int64()).to_numpy()
    at = np.flatnonzero(floats)
    v = arr.filter(pa.array(floats)).cast(pa.float64()).to_numpy()
    out[at] = _whole(b, fld, v, at, lambda k: arr[int(at[k])].as_py())
    # Written as a float, an id from 2^53 on may not survive the reading: 9007199254740993.0
    # reads as ...992, and would merge with that id.
    inexact = np.abs(v) >= 2.0**53
    if inexact.any():
        k = int(np.flatnonzero(inexact)[0])
        raise InputError(
            f"{b.where(int(at[k]), fld)}: id {arr[int(at[k])].as_py()!r} is written as a float "
            "of 2^53 or more, which cannot be read exactly: write the ids as integers, or set "
            "data.id_type: string"
        )
    return pa.array(out)


def _beyond_int64(arr: pa.Array) -> np.ndarray:
    """Which of the strings ``arr``, read as canonical integers, are outside int64: longer than
    the text of the bound on their side, or as long and greater (digit strings of one length
    compare as their numbers do)."""
    neg = _mask(pc.starts_with(arr, "-"))
    n = pc.binary_length(arr).to_numpy()
    limit = np.where(neg, len(_INT64_MIN_TEXT), len(_INT64_MAX_TEXT))
    greater = np.where(
        neg, _mask(pc.greater(arr, _INT64_MIN_TEXT)), _mask(pc.greater(arr, _INT64_MAX_TEXT))
    )
    return (n > limit) | ((n == limit) & greater)


def _timestamps(b: Batch, arr: pa.Array) -> np.ndarray:
    if arr.null_count:
        k = int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])
        raise InputError(f"{b.where(k, 'timestamp')}: the timestamp is missing")
    t = arr.type
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        arr = arr.cast(pa.timestamp("s")) if pa.types.is_date(t) else arr
        return arr.cast(pa.int64()).to_numpy()
    if pa.types.is_integer(t):
        return arr.to_numpy().astype(np.int64, copy=False)
    if pa.types.is_floating(t):
        v = arr.to_numpy()
        if not np.isfinite(v).all():
            k = int(np.flatnonzero(~np.isfinite(v))[0])
            raise InputError(f"{b.where(k, 'timestamp')}: timestamp {v[k]} is not finite")
        return np.floor(v).astype(np.int64)
    raise InputError(
        f"{b.file}, column {b.colnames['timestamp']!r} (data.columns.timestamp): timestamps of "
        f"type {t} are not supported; use numbers (e.g. Unix seconds) or dates"
    )


def _ratings(b: Batch, arr: pa.Array) -> np.ndarray:
    t = arr.type
    if not (pa.types.is_floating(t) or pa.types.is_integer(t) or pa.types.is_decimal(t)):
        raise InputError(
            f"{b.file}, column {b.colnames['rating']!r} (data.columns.rating): ratings of type "
            f"{t} are not numbers"
        )
    return arr.cast(pa.float64()).to_numpy(zero_copy_only=False)


def _make_batch(
    file: str,
    kind: str,
    first: int,
    cols: dict[str, pa.Array],
    colnames: dict[str, str],
    spec: InputSpec,
) -> Batch:
    """The batch of ``cols``, checked; ids of CSV files (``kind`` "line") are text whose type
    is decided here (:func:`_check_ids`)."""
    b = Batch(file, kind, first, None, None, None, None, colnames)  # type: ignore[arg-type]
    b.user = _check_ids(b, "user", cols["user"], spec, text=kind == "line")
    b.item = _check_ids(b, "item", cols["item"], spec, text=kind == "line")
    if "rating" in cols:
        b.rating = _ratings(b, cols["rating"])
    else:  # data.columns.rating: null: every event counts 1
        b.rating = np.ones(len(cols["user"]), dtype=np.float64)
    b.timestamp = _timestamps(b, cols["timestamp"]) if "timestamp" in cols else None
    return b


def _unify_ids(spec: InputSpec, b: Batch) -> None:
    """Hold every batch to its side's id type (``spec.id_types``, which the first batch settles
    under ``data.id_type: auto``). Integers may become strings (their decimal text), not back:
    string ids on an integer side raise :class:`IdTypeMismatch`, and ingest re-reads the input
    with that side as strings, so the type is decided over the whole input."""
    for fld in ID_FIELDS:
        arr = getattr(b, fld)
        kind = "string" if pa.types.is_string(arr.type) else "int"
        want = spec.id_types.setdefault(fld, kind)
        if kind == want:
            continue
        if want == "string":
            setattr(b, fld, arr.cast(pa.string()))
        else:
            raise IdTypeMismatch(fld)


def _csv_options(
    layout: _CsvLayout, types: dict[str, pa.DataType], block: int
) -> tuple[pa_csv.ReadOptions, pa_csv.ParseOptions, pa_csv.ConvertOptions]:
    """Arrow's read, parse and convert options for a file of ``layout``."""
    read = pa_csv.ReadOptions(
        block_size=block,
        autogenerate_column_names=not layout.header,
        use_threads=True,
    )
    parse = pa_csv.ParseOptions(delimiter=_effective_delimiter(layout.delimiter))
    convert = pa_csv.ConvertOptions(
        include_columns=list(layout.select.values()),
        column_types={layout.select[k]: t for k, t in types.items() if k in layout.select},
        strings_can_be_null=False,
        quoted_strings_can_be_null=False,
    )
    return read, parse, convert


def _csv_error(
    exc: pa.ArrowInvalid,
    f: InputFile,
    layout: _CsvLayout,
    disp: dict[str, str],
    block: int,
    spec: InputSpec,
) -> InputError:
    """The error for Arrow's parse error ``exc``, naming the offending line (found by a
    rescan)."""
    found = _diagnose_csv(f, layout, disp, layout.types, spec.max_id_length)
    if found is not None:
        return InputError(found)
    msg = str(exc)
    if "straddling" in msg:
        return InputError(
            f"{f.path}: a line is longer than the read block ({block} bytes); raise "
            f"data.batch_rows ({spec.batch_rows}) ({msg})"
        )
    return InputError(f"{f.path}: cannot parse as CSV (data.delimiter {layout.delimiter!r}): {msg}")


def _iter_csv(f: InputFile, spec: InputSpec) -> Iterator[Batch]:
    layout, disp = _sniff_csv(f, spec)
    # Parse blocks of at most 4 MiB: Arrow parses small blocks faster (cache), and ingest gathers
    # them into chunks of batch_rows rows anyway.
    block = int(max(min(spec.batch_rows * layout.avg_line, 1 << 22), 8 * layout.max_line, 1024))
    read, parse, convert = _csv_options(layout, layout.types, block)
    field_of = {v: k for k, v in layout.select.items()}
    colnames = {k: disp[k] for k in layout.select}
    stream = open_text_stream(f, layout.delimiter)
    try:
        try:
            reader = pa_csv.open_csv(
                stream, read_options=read, parse_options=parse, convert_options=convert
            )
        except pa.ArrowInvalid as exc:
            raise _csv_error(exc, f, layout, disp, block, spec) from None
        line = 2 if layout.header else 1
        while True:
            try:
                rb = reader.read_next_batch()
            except StopIteration:
                break
            except pa.ArrowInvalid as exc:
                raise _csv_error(exc, f, layout, disp, block, spec) from None
            if rb.num_rows == 0:
                continue
            cols = {field_of[n]: rb.column(n) for n in rb.schema.names}
            b = _make_batch(str(f.path), "line", line, cols, colnames, spec)
            _unify_ids(spec, b)
            yield b
            line += rb.num_rows
    finally:
        stream.close()


def _iter_parquet(f: InputFile, spec: InputSpec) -> Iterator[Batch]:
    try:
        fs, path = f.path.arrow()
        pf = pq.ParquetFile(path, filesystem=fs)
    except (OSError, pa.ArrowException, StorageError) as exc:
        raise InputError(f"{f.path}: not a readable Parquet file: {exc}") from exc
    try:
        yield from _parquet_batches(f, spec, pf)
    finally:
        pf.close()


def _parquet_batches(f: InputFile, spec: InputSpec, pf: pq.ParquetFile) -> Iterator[Batch]:
    names = pf.schema_arrow.names
    select: dict[str, str] = {}
    for fld, col in spec.columns.items():
        if isinstance(col, int):
            if col >= len(names):
                raise InputError(
                    f"{f.path}: data.columns.{fld} is position {col}, but the file has "
                    f"{len(names)} column(s): {names}"
                )
            select[fld] = names[col]
        elif col not in names:
            raise InputError(
                f"{f.path}: column {col!r} (data.columns.{fld}) not found; columns found: "
                f"{', '.join(repr(n) for n in names)}"
            )
        else:
            select[fld] = col
    row = 1
    try:
        # A remote file is read through Python file objects: no Arrow threads then (see
        # dmf.store.storage.read_verified_buffer).
        batches = pf.iter_batches(
            batch_size=spec.batch_rows,
            columns=list(select.values()),
            use_threads=f.path.is_local,
        )
        for rb in batches:
            if rb.num_rows == 0:
                continue
            cols = {fld: rb.column(col) for fld, col in select.items()}
            b = _make_batch(str(f.path), "row", row, cols, select, spec)
            _unify_ids(spec, b)
            yield b
            row += rb.num_rows
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"{f.path}, near row {row}: cannot read Parquet: {exc}") from exc


def iter_batches(spec: InputSpec) -> Iterator[Batch]:
    """Every row of every input file, in order, as batches of about ``spec.batch_rows`` rows."""
    for f in spec.files:
        if f.format == "parquet":
            yield from _iter_parquet(f, spec)
        else:
            yield from _iter_csv(f, spec)


__all__ = [
    "PRESETS",
    "Batch",
    "IdTypeMismatch",
    "InputFile",
    "InputSpec",
    "iter_batches",
    "resolve_inputs",
    "open_text_stream",
]
