"""Bad input: one test per class. Each error must name the file, the line or row, and the column
(or the config key of the policy), and say what to do; policies drop and count instead."""

from __future__ import annotations

import gzip
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dmf.config import load_config
from dmf.data.ingest import ingest
from dmf.errors import InputError, StoreError

GOOD = ["user,item,rating", "1,10,4.0", "2,10,3.5", "2,11,1.0", "3,12,5.0"]


def write(tmp_path: Path, lines, name="r.csv") -> Path:
    p = tmp_path / name
    data = lines if isinstance(lines, bytes) else ("\n".join(lines) + "\n").encode()
    p.write_bytes(data)
    return p


def run(tmp_path, source, **data):
    cfg = load_config(
        raw={
            "data": {"source": str(source), **data},
            "split": {"method": "none"},
            "store": {"path": str(tmp_path / "store")},
        }
    )
    return ingest(cfg, progress=False)


def no_store_left(tmp_path):
    assert not (tmp_path / "store").exists()
    assert not list(tmp_path.glob(".store.tmp-*"))


@pytest.mark.parametrize("bad", ["nan", "NaN", "inf", "-inf", ""])
def test_non_finite_or_null_rating(tmp_path, bad):
    f = write(tmp_path, GOOD[:3] + [f"5,13,{bad}"] + GOOD[3:])
    with pytest.raises(InputError) as e:
        run(tmp_path, f)
    msg = str(e.value)
    assert f"{f}, line 4, column 'rating' (data.columns.rating)" in msg
    assert "data.invalid_ratings: drop" in msg
    no_store_left(tmp_path)
    store = run(tmp_path, f, invalid_ratings="drop")
    assert store.n_train == 4 and store.manifest.dropped.invalid_ratings == 1


def test_rating_out_of_range(tmp_path):
    f = write(tmp_path, GOOD + ["4,10,7.5"])
    with pytest.raises(InputError, match=r"line 6, column 'rating'.*outside data.rating_range"):
        run(tmp_path, f, rating_range=[0.5, 5])
    store = run(tmp_path, f, rating_range=[0.5, 5], out_of_range="drop")
    assert store.n_train == 4 and store.manifest.dropped.out_of_range == 1


def test_rating_that_is_not_a_number(tmp_path):
    f = write(tmp_path, GOOD + ["4,10,five"])
    with pytest.raises(InputError, match=r"line 6, column 'rating' .*'five' is not a number"):
        run(tmp_path, f)


def test_duplicate_pairs(tmp_path):
    f = write(tmp_path, GOOD + ["2,11,2.0"])
    with pytest.raises(InputError) as e:
        run(tmp_path, f)
    msg = str(e.value)
    assert "user 2" in msg and "item 11" in msg and "data.duplicates" in msg
    no_store_left(tmp_path)


def test_missing_or_misnamed_column(tmp_path):
    f = write(tmp_path, ["userId,movieId,rating"] + GOOD[1:])
    with pytest.raises(InputError) as e:
        run(tmp_path, f)
    msg = str(e.value)
    assert "column 'user' (data.columns.user) not found" in msg
    assert "'userId', 'movieId', 'rating'" in msg


def test_named_columns_on_a_file_without_header(tmp_path):
    f = write(tmp_path, GOOD[1:])
    with pytest.raises(InputError, match=r"column 'user' .*not found.*looks like data.*positions"):
        run(tmp_path, f)


def test_column_position_beyond_the_row(tmp_path):
    f = write(tmp_path, GOOD[1:])
    with pytest.raises(InputError, match=r"data.columns.rating is position 5.*3 column"):
        run(tmp_path, f, columns={"user": 0, "item": 1, "rating": 5})


def test_names_without_a_header(tmp_path):
    f = write(tmp_path, GOOD[1:])
    with pytest.raises(InputError, match=r"data.header is false.*positions"):
        run(tmp_path, f, header=False)


def test_wrong_delimiter(tmp_path):
    f = write(tmp_path, [x.replace(",", ";") for x in GOOD])
    with pytest.raises(InputError, match=r"Only one column was found.*data.delimiter"):
        run(tmp_path, f, delimiter=",")


def test_ragged_row(tmp_path):
    f = write(tmp_path, GOOD[:3] + ["7,10"] + GOOD[3:])
    with pytest.raises(InputError, match=rf"{f}, line 4: 2 field\(s\), expected 3"):
        run(tmp_path, f)
    f = write(tmp_path, GOOD[:2] + ["7,10,3.0,extra"] + GOOD[2:], name="more.csv")
    with pytest.raises(InputError, match=r"more.csv, line 3: 4 field\(s\), expected 3"):
        run(tmp_path, f)


def test_ragged_row_in_a_later_batch_of_a_compressed_file(tmp_path):
    lines = ["user,item,rating"] + [f"{k},{k % 13},3.0" for k in range(3000)]
    lines[2500] = "9,9"
    f = tmp_path / "r.csv.gz"
    f.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    with pytest.raises(InputError, match=r"r.csv.gz, line 2501: 2 field"):
        run(tmp_path, f, batch_rows=100)


@pytest.mark.parametrize("bad", ["2.5", "-0.5"])
def test_fractional_id(tmp_path, bad):
    f = write(tmp_path, GOOD + [f"{bad},10,3.0"])
    with pytest.raises(
        InputError, match=r"line 6, column 'user' \(data.columns.user\).*fractional"
    ):
        run(tmp_path, f)


def test_fractional_id_in_sniffed_sample(tmp_path):
    f = write(tmp_path, ["user,item,rating", "1,10,4.0", "2.5,10,3.0"])
    with pytest.raises(InputError, match=r"line 3, column 'user'.*2.5 is fractional"):
        run(tmp_path, f)


def test_null_id(tmp_path):
    f = write(tmp_path, GOOD + [",10,3.0"])
    with pytest.raises(InputError, match=r"line 6, column 'user' \(data.columns.user\).*missing"):
        run(tmp_path, f)


def test_null_id_parquet(tmp_path):
    f = tmp_path / "r.parquet"
    pq.write_table(pa.table({"user": [1, None, 3], "item": [1, 2, 3], "rating": [1.0, 2, 3]}), f)
    with pytest.raises(InputError, match=rf"{f}, row 2, column 'user'.*missing"):
        run(tmp_path, f)


def test_non_utf8_bytes_in_string_ids(tmp_path):
    data = ("\n".join(["user,item,rating", "alice,10,4.0", "bob,10,3.0"]) + "\n").encode()
    data += b"caf\xe9,11,2.0\n"
    f = write(tmp_path, data)
    with pytest.raises(InputError) as e:
        run(tmp_path, f)
    msg = str(e.value)
    assert f"{f}, line 4, column 'user'" in msg and "UTF-8" in msg


def test_empty_file(tmp_path):
    f = write(tmp_path, b"")
    with pytest.raises(InputError, match=rf"{f}: the file is empty"):
        run(tmp_path, f)


def test_header_only(tmp_path):
    f = write(tmp_path, GOOD[:1])
    with pytest.raises(
        InputError, match=r"no ratings in .*r.csv: the input is empty or has only a header"
    ):
        run(tmp_path, f)
    no_store_left(tmp_path)


def test_everything_filtered_away(tmp_path):
    f = write(tmp_path, ["user,item,rating", "1,1,nan", "2,2,9", "3,3,-4"])
    with pytest.raises(InputError) as e:
        run(tmp_path, f, invalid_ratings="drop", rating_range=[1, 5], out_of_range="drop")
    msg = str(e.value)
    assert "all 3 input rows were dropped" in msg
    assert "1 by data.invalid_ratings" in msg and "2 by data.out_of_range" in msg


def test_missing_source_and_empty_glob(tmp_path):
    with pytest.raises(InputError, match=r"does not exist"):
        run(tmp_path, tmp_path / "nope.csv")
    with pytest.raises(InputError, match=r"matches no files"):
        run(tmp_path, tmp_path / "*.csv")


def test_non_empty_store_directory_is_refused(tmp_path, caplog):
    f = write(tmp_path, GOOD)
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "keep.txt").write_text("mine")
    with caplog.at_level("WARNING", logger="dmf"):
        with pytest.raises(StoreError, match=r"not empty.*store.overwrite"):
            run(tmp_path, f)
    assert (tmp_path / "store" / "keep.txt").read_text() == "mine"
    # Not dmf's file: not offered to `dmf clean` as a leftover of an interrupted ingest.
    assert "keep.txt" not in caplog.text


def test_split_that_leaves_no_train_ratings_is_an_error(tmp_path):
    # Every timestamp equal: the temporal cutoff sends all of them to the test side.
    from dmf.config import load_config
    from dmf.data.ingest import ingest
    from dmf.errors import InputError

    f = tmp_path / "r.csv"
    f.write_text(
        "user,item,rating,timestamp\n"
        + "".join(f"{u},{i},4,100\n" for u in range(5) for i in range(4))
    )
    cfg = load_config(
        raw={
            "data": {"source": str(f), "columns": {"timestamp": "timestamp"}},
            "split": {"method": "temporal", "test": 0.2},
            "store": {"path": str(tmp_path / "store")},
        }
    )
    with pytest.raises(InputError, match="split.test"):
        ingest(cfg, progress=False)
    assert not (tmp_path / "store").exists()


def test_string_id_with_a_nul_byte_is_an_error(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dmf.config import load_config
    from dmf.data.ingest import ingest
    from dmf.errors import InputError

    f = tmp_path / "r.parquet"
    pq.write_table(pa.table({"user": ["a", "b\x00"], "item": ["x", "y"], "rating": [4.0, 3.0]}), f)
    cfg = load_config(
        raw={
            "data": {"source": str(f)},
            "store": {"path": str(tmp_path / "s")},
            "split": {"method": "none"},
        }
    )
    with pytest.raises(InputError, match="NUL byte"):
        ingest(cfg, progress=False)


# -- raw ids: data.id_type, canonical integers, data.max_id_length ---------------------------

PADDED = ["user,item,rating", "007,10,4.0", "7,10,3.0", "0007,11,2.0", "8,12,1.0"]


@pytest.mark.parametrize("id_type", ["auto", "string"])
@pytest.mark.parametrize("id_partition_rows", [None, 1])
def test_zero_padded_ids_are_distinct_users(tmp_path, id_type, id_partition_rows):
    """'007', '7' and '0007' are three users, never user 7 three times; the user side is ranked
    range by range on workers (one range per row here), with the same exact strings."""
    f = write(tmp_path, PADDED)
    data = {"id_type": id_type}
    if id_partition_rows is not None:
        data["id_partition_rows"] = id_partition_rows
    store = run(tmp_path, f, **data)
    assert store.ids("user").type == pa.string()
    assert store.ids("user").to_pylist() == ["0007", "007", "7", "8"]
    assert store.n_train == 4
    assert store.ids("item").to_pylist() == (
        [10, 11, 12] if id_type == "auto" else ["10", "11", "12"]
    )


def test_zero_padded_id_is_an_error_under_id_type_int(tmp_path):
    f = write(tmp_path, PADDED)
    with pytest.raises(InputError) as e:
        run(tmp_path, f, id_type="int")
    msg = str(e.value)
    assert f"{f}, line 2, column 'user' (data.columns.user): id '007' is not a plain integer" in msg
    assert "data.id_type" in msg
    no_store_left(tmp_path)


def test_id_type_int_names_the_line_of_the_first_id_that_is_not_an_integer(tmp_path):
    lines = ["user,item,rating"] + [f"{k},{k % 5},3.0" for k in range(700)]
    lines[650] = "abc,3,3.0"
    f = write(tmp_path, lines)
    with pytest.raises(InputError, match=rf"{f}, line 651, column 'user'.*'abc' is not a plain"):
        run(tmp_path, f, id_type="int", batch_rows=100)
    # auto reads them all as strings instead, "abc" coming after the sniffed lines and batches.
    store = run(tmp_path, f, batch_rows=100)
    assert store.ids("user").type == pa.string() and "abc" in store.ids("user").to_pylist()


@pytest.mark.parametrize("odd", ["１", "1_0", "+1", "-0", "0x1F", " 1"])
def test_integers_python_or_arrow_would_accept_are_string_ids_under_auto(tmp_path, odd):
    """Fullwidth digits, underscores (Python's int() takes both), a '+', '-0' or hex (Arrow's
    parser takes these): not canonical integers, so the side is read as strings, exactly."""
    f = write(tmp_path, ["user,item,rating", "1,10,4.0", f"{odd},10,3.0", "31,11,2.0"])
    store = run(tmp_path, f)
    assert sorted(store.ids("user").to_pylist()) == sorted(["1", odd, "31"])
    assert store.ids("item").to_pylist() == [10, 11]


def test_integers_beyond_int64(tmp_path):
    big = "9223372036854775808"  # 2^63: canonical, but no int64 holds it
    f = write(
        tmp_path, ["user,item,rating", "1,10,4.0", f"{big},10,3.0", "-9223372036854775808,11,1"]
    )
    assert run(tmp_path, f).ids("user").to_pylist() == ["-9223372036854775808", "1", big]
    with pytest.raises(InputError, match=rf"line 3, column 'user'.*'{big}' is outside the int64"):
        run(tmp_path / "as-int", f, id_type="int")


@pytest.mark.parametrize("value", [1e19, 9.3e18, -1e19, float(2**63)])
def test_float_id_beyond_int64_is_an_error_naming_the_file_and_row(tmp_path, value):
    f = tmp_path / "r.parquet"
    t = pa.table({"user": [1.0, 2.0, value], "item": [1, 2, 3], "rating": [1.0, 2.0, 3.0]})
    pq.write_table(t, f)
    with pytest.raises(InputError) as e:
        run(tmp_path, f)
    assert f"{f}, row 3, column 'user' (data.columns.user)" in str(e.value)
    assert "outside the int64 range" in str(e.value)
    no_store_left(tmp_path)


def test_whole_float_ids_in_int64_range_are_integers(tmp_path):
    f = tmp_path / "r.parquet"
    low = -(2.0**63)  # the smallest int64, exactly a float
    t = pa.table({"user": [1.0, 2.0, low], "item": [1, 2, 3], "rating": [1.0, 2.0, 3.0]})
    pq.write_table(t, f)
    assert run(tmp_path, f).ids("user").to_pylist() == [-(2**63), 1, 2]
    # Written as text among integers: numbers, which must be whole and within int64 too.
    c = write(tmp_path, ["user,item,rating", "1,10,4.0", "2.0,10,3.0", "1e19,11,1"])
    with pytest.raises(InputError, match=rf"{c}, line 4, column 'user'.*1e19 is outside the int64"):
        run(tmp_path / "csv", c)


def test_id_longer_than_max_id_length_names_the_line(tmp_path):
    long = "é" * 600  # 1200 bytes in UTF-8: data.max_id_length counts bytes
    f = write(tmp_path, ["user,item,rating", "a,10,4.0", f"{long},10,3.0"])
    with pytest.raises(InputError) as e:
        run(tmp_path, f)
    msg = str(e.value)
    assert f"{f}, line 3, column 'user' (data.columns.user): an id of 1200 bytes" in msg
    assert "data.max_id_length (1024 bytes)" in msg
    no_store_left(tmp_path)
    assert long in run(tmp_path, f, max_id_length=1200).ids("user").to_pylist()


@pytest.mark.parametrize("quoted", [False, True])
def test_huge_field_before_a_bad_rating_is_an_input_error(tmp_path, quoted):
    """A field over Python's csv limit (128 KiB) on the line the rescan for a bad rating meets
    first is named, not a raw csv.Error."""
    huge = "x" * 200_000
    huge = f'"{huge}"' if quoted else huge
    f = write(tmp_path, ["user,item,rating", "1,10,4.0", f"2,{huge},3.0", "3,11,five"])
    with pytest.raises(InputError) as e:
        run(tmp_path, f)
    msg = str(e.value)
    assert f"{f}, line 3" in msg and "data.max_id_length" in msg
    no_store_left(tmp_path)


def test_float_text_ids_beyond_2_to_the_53_are_an_error_not_merged(tmp_path):
    """9007199254740993.0 reads as the float ...992: it would merge with user ...992."""
    f = write(
        tmp_path, ["user,item,rating", "9007199254740992,10,4.0", "9007199254740993.0,10,3.0"]
    )
    with pytest.raises(InputError, match=rf"{f}, line 3, column 'user'.*2\^53"):
        run(tmp_path, f)
    assert sorted(run(tmp_path / "s", f, id_type="string").ids("user").to_pylist()) == [
        "9007199254740992",
        "9007199254740993.0",
    ]
