"""Readers: batches of real files, delimiters, compression, Parquet, sniffing, line numbers."""

from __future__ import annotations

import gzip
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dmf.config import load_config
from dmf.data.readers import _DelimiterTranslator, iter_batches, resolve_inputs


def spec_for(source, **data):
    cfg = load_config(raw={"data": {"source": str(source), **data}})
    return resolve_inputs(cfg.data, cfg.resolve)


def collect(spec):
    batches = list(iter_batches(spec))
    users = [x for b in batches for x in b.user.to_pylist()]
    items = [x for b in batches for x in b.item.to_pylist()]
    ratings = np.concatenate([b.rating for b in batches]) if batches else np.zeros(0)
    return batches, users, items, ratings


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.sampled_from([b"a", b"1", b":", b"::", b"\n", b"x:y"]), max_size=60),
    st.integers(1, 7),
    st.sampled_from([b"::", b"|||", b"ab"]),
)
def test_delimiter_translator_matches_replace_at_any_chunking(parts, chunk, delim):
    data = b"".join(parts).replace(b"::", delim)
    raw = io.BytesIO(data)
    out = []
    tr = _DelimiterTranslator(raw, delim, chunk=chunk)
    while True:
        piece = tr.read(chunk + 2)
        if not piece:
            break
        out.append(piece)
    assert b"".join(out) == data.replace(delim, b"\x1f")


def test_double_colon_file_in_many_batches(tmp_path):
    n = 5000
    lines = [f"{k % 97}::{k % 89}::{(k % 10) / 2 + 0.5}::{1000 + k}" for k in range(n)]
    f = tmp_path / "ratings.dat"
    f.write_text("\n".join(lines) + "\n")
    spec = spec_for(f, columns={"user": 0, "item": 1, "rating": 2, "timestamp": 3}, batch_rows=100)
    batches, users, items, ratings = collect(spec)
    assert len(batches) > 5
    assert users == [k % 97 for k in range(n)]
    assert items == [k % 89 for k in range(n)]
    assert np.allclose(ratings, [(k % 10) / 2 + 0.5 for k in range(n)])
    ts = np.concatenate([b.timestamp for b in batches])
    assert np.array_equal(ts, 1000 + np.arange(n))
    # Line numbers continue across batches (no header: row k is on line k + 1).
    starts = [b.first for b in batches]
    sizes = [len(b) for b in batches]
    assert starts == list(1 + np.cumsum([0] + sizes[:-1]))
    assert spec.delimiter is None  # sniffed


@pytest.mark.parametrize("codec", ["gzip", "zstd"])
@pytest.mark.parametrize("suffix", [True, False])
def test_compressed_csv_detected_by_magic_or_suffix(tmp_path, codec, suffix):
    text = "user\titem\trating\n" + "".join(f"u{k}\ti{k % 5}\t{k % 5 + 1}\n" for k in range(300))
    if codec == "gzip":
        data = gzip.compress(text.encode())
    else:
        data = pa.compress(text.encode(), codec="zstd", asbytes=True)
        # pa.compress writes a bare frame without the content size header: fine for streaming.
    name = "r.tsv" + ((".gz" if codec == "gzip" else ".zst") if suffix else "")
    f = tmp_path / name
    f.write_bytes(data)
    spec = spec_for(f, batch_rows=50)
    assert spec.files[0].compression == codec
    _, users, items, ratings = collect(spec)
    assert users == [f"u{k}" for k in range(300)]
    assert ratings.sum() == sum(k % 5 + 1 for k in range(300))


def test_header_sniffed_with_positional_columns(tmp_path):
    f = tmp_path / "h.csv"
    f.write_text("a,b,c\n1,2,3.5\n")
    _, users, _, ratings = collect(spec_for(f, columns={"user": 0, "item": 1, "rating": 2}))
    assert users == [1] and ratings.tolist() == [3.5]
    f.write_text("1,2,3.5\n4,5,1\n")
    _, users, _, _ = collect(spec_for(f, columns={"user": 0, "item": 1, "rating": 2}))
    assert users == [1, 4]


def test_parquet_positions_integer_floats_and_dictionary_strings(tmp_path):
    f = tmp_path / "r.parquet"
    t = pa.table(
        {
            "r": pa.array([1.0, 2.0, 3.0], pa.float32()),
            "u": pa.array([1.0, 2.0, 3.0]),  # whole floats: read as int ids
            "i": pa.array(["a", "b", "a"]).dictionary_encode(),
        }
    )
    pq.write_table(t, f)
    spec = spec_for(f, columns={"user": 1, "item": 2, "rating": 0}, batch_rows=2)
    batches, users, items, ratings = collect(spec)
    assert len(batches) == 2
    assert users == [1, 2, 3] and items == ["a", "b", "a"] and ratings.tolist() == [1, 2, 3]
    assert batches[1].where(0, "user") == f"{f}, row 3, column 'u' (data.columns.user)"


def test_directory_skips_hidden_and_underscore_files(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "a.csv").write_text("user,item,rating\n1,1,1\n")
    (d / "_SUCCESS").write_text("")
    (d / ".hidden.csv").write_text("junk\n")
    (d / "notes.md").write_text("not ratings\n")
    sub = d / "sub"
    sub.mkdir()
    (sub / "b.csv").write_text("user,item,rating\n2,2,2\n")
    spec = spec_for(d)
    assert [p.path.name for p in spec.files] == ["a.csv", "b.csv"]


def test_byte_order_mark_and_crlf_line_ends(tmp_path):
    f = tmp_path / "bom.csv"
    f.write_bytes(b"\xef\xbb\xbfuser,item,rating\r\nu1,i1,3\r\nu2,i1,4.5\r\n")
    _, users, items, ratings = collect(spec_for(f))
    assert users == ["u1", "u2"] and items == ["i1", "i1"] and ratings.tolist() == [3, 4.5]


def test_directory_order_is_by_path_components_as_before(tmp_path):
    # pathlib order (what the readers listed by before they went through fsspec): "sub/b.csv"
    # before "sub-x.csv", though "-" sorts before "/" as a string.
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    for rel in ("sub-x.csv", "sub/b.csv", "a.csv"):
        (d / rel).write_text("user,item,rating\n1,1,1\n")
    spec = spec_for(d)
    assert [str(f.path) for f in spec.files] == [
        str(d / r) for r in ("a.csv", "sub/b.csv", "sub-x.csv")
    ]


def test_file_url_is_the_local_path(tmp_path):
    f = tmp_path / "r.csv"
    f.write_text("user,item,rating\n1,2,3.5\n")
    spec = spec_for(f"file://{f}")
    assert [str(x.path) for x in spec.files] == [str(f)]
    assert spec.files[0].path.is_local
    assert collect(spec)[1] == [1]


def test_synth_output_is_read_through_its_manifest(tmp_path):
    """Versioned file names, and files no manifest lists (an interrupted synth's), which must
    not be read as ratings: the directory and its ratings directory both go by synth.json."""
    import shutil

    from dmf.config import SynthConfig
    from dmf.data.synth import synth, synth_files

    out = tmp_path / "syn"
    synth(SynthConfig(n_users=30, n_items=20, n_ratings=200, files=2), out, progress=False)
    listed = synth_files(out)
    ratings = [str(listed[f"ratings/part-0000{k}.parquet"]) for k in range(2)]
    # Leftovers of a killed synth: another version's file, and a stray one.
    shutil.copy(ratings[0], out / "ratings" / "part-00000.0badc0de.parquet")
    (out / "ratings" / "part-00009.parquet").write_bytes(b"PAR1 half a file")
    for source in (out, out / "ratings"):
        spec = spec_for(source, columns={"timestamp": "timestamp"})
        assert [str(f.path) for f in spec.files] == ratings
        assert len(collect(spec)[1]) == 200
    # A plain copy of the ratings directory (no synth.json) is read by listing it.
    plain = tmp_path / "plain"
    shutil.copytree(out / "ratings", plain)
    assert len(spec_for(plain).files) == 4
